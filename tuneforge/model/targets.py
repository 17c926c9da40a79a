"""Parts of a model: the one place that matches module names (``find``), the stack of blocks, the
output head (and ``head_only_at``, which shows it only some positions), and ``swap``.

A pattern is a list of names (``["q_proj", "v_proj"]`` matches ``...self_attn.q_proj``, and
``mlp.c_proj`` the paths that end so: PEFT's rule), a regular expression matched against the whole
module path (PEFT's rule for a string), or ``"all-linear"``: every linear layer but the output head.
Matching nothing is an error that lists the closest names, since a silent no-op would train nothing.
A regular expression is matched with a time limit (``MATCH_SECONDS`` for all names together): nested
quantifiers such as ``(.*?){20}x`` backtrack for hours in Python's ``re``, and a config file may come
from anyone. The ``regex`` package (which transformers requires) matches with Python's syntax and a
timeout.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import time
import warnings
from typing import Callable, Iterable, Iterator

import regex
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tuneforge.core.errors import TuneforgeWarning, UserError

LINEAR = (nn.Linear, Conv1D)  # linear-like layers: GPT-2's Conv1D is a linear layer with its weight stored (in, out)
MATCH_SECONDS = 2.0  # all of a model's module names take microseconds against any sane expression


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def selects(name: str, pattern: str) -> bool:
    """PEFT's rule for a name in a list: the whole path, or its last dotted parts (``mlp.c_proj``)."""
    return name == pattern or name.endswith("." + pattern)


def find(model: nn.Module, patterns: str | Iterable[str], types: tuple[type, ...] = LINEAR,
         key: str = "target_modules") -> list[str]:
    """Names of the modules of ``types`` in ``model`` that ``patterns`` select, in model order. Of a
    list, the names that select nothing are named in a warning (or an error, when none selects)."""
    candidates = {name: mod for name, mod in model.named_modules() if name and isinstance(mod, types)}
    if isinstance(patterns, str) and patterns == "all-linear":
        head = output_head(model)
        hits = [name for name, mod in candidates.items() if mod is not head]
    elif isinstance(patterns, str):
        matched = full_matches(patterns, list(candidates), key)
        hits = [name for name in candidates if name in matched]
    else:
        patterns = list(patterns)
        hits = [name for name in candidates if any(selects(name, p) for p in patterns)]
        unmatched = [p for p in patterns if not any(selects(name, p) for name in candidates)]
        if hits and unmatched:
            kinds = "/".join(t.__name__ for t in types)
            warnings.warn(f"{key}: {unmatched} match no {kinds} module of this model; only "
                          f"{sorted({h.rsplit('.', 1)[-1] for h in hits})} are targeted", TuneforgeWarning,
                          stacklevel=3)
    if not hits:
        leaf_names = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        wanted = [patterns] if isinstance(patterns, str) else list(patterns)
        close = sorted({c for w in wanted for c in difflib.get_close_matches(w, leaf_names, n=3, cutoff=0.3)})
        raise UserError(f"{wanted} matches no {'/'.join(t.__name__ for t in types)} module of this model", key,
                        fix=f"closest names: {', '.join(close or leaf_names[:8])}; "
                            "'all-linear' takes every linear layer")
    return hits


def full_matches(pattern: str, names: list[str], key: str) -> set[str]:
    """The names ``pattern`` matches whole (PEFT's rule for a string), within ``MATCH_SECONDS`` in all."""
    try:
        re.compile(pattern)  # Python's own syntax, which PEFT uses, decides what is valid
        compiled = regex.compile(pattern)
    except (re.error, regex.error) as exc:
        raise UserError(f"invalid regular expression {pattern!r} ({exc})", key) from None
    deadline = time.monotonic() + MATCH_SECONDS
    try:
        return {name for name in names if compiled.fullmatch(name, timeout=max(deadline - time.monotonic(), 0.0))}
    except TimeoutError:
        raise UserError(f"the regular expression {pattern!r} did not finish matching {len(names)} module names in "
                        f"{MATCH_SECONDS:g} s (nested quantifiers such as (.*)* backtrack without end)", key,
                        fix="list the names instead, for example [q_proj, v_proj], or write the expression without "
                            "nested repeats") from None


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the longest ModuleList in it."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError(f"cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=len)


def swap(model: nn.Module, path: str, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Put ``make(old)`` where the submodule at ``path`` was (how every method attaches, and how a
    merge puts the plain layer back); returns the new module."""
    parent, _, child = path.rpartition(".")
    parent = model.get_submodule(parent)
    new = make(getattr(parent, child))
    setattr(parent, child, new)
    return new


@contextlib.contextmanager
def head_only_at(model: nn.Module, keep: Tensor) -> Iterator[None]:
    """While active, the output head sees only the positions where ``keep`` (batch, seq) is True,
    and the model's ``logits`` come out as (n_kept, vocab), in row-major order. A method that
    prepends virtual tokens lengthens the sequence; those leading positions are never kept.

    A causal LM projects every position onto the vocabulary (49,152 columns for the default model),
    yet a supervised example carries loss on a handful of answer tokens: a forward pre-hook on the
    head gathers the positions that matter, and the model's own forward runs unchanged."""
    def gather(_module, args):
        hidden = args[0]  # (batch, seq + n_virtual, hidden)
        mask = keep
        if hidden.shape[1] != mask.shape[1]:
            mask = F.pad(mask, (hidden.shape[1] - mask.shape[1], 0), value=False)
        return (hidden[mask],)  # (n_kept, hidden)

    handle = output_head(model).register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
