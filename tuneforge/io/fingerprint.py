"""A short description of a base model, saved with every adapter, so that loading the adapter onto
another base fails with a clear message instead of producing garbage.

The hash reads tensors no method replaces and no quantizer touches: the first rows of the input
embeddings and the 1-D parameters (norms, biases) of the first and last blocks. Tensors an adapter
trains or saves itself (``exclude``: its modules_to_save, a method's own vectors) are left out, so
the hash of a trained model equals that of its base. Values are hashed as bfloat16, so a base
loaded in float32 or bfloat16 gives the same fingerprint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from tuneforge import targets
from tuneforge.errors import UserError

EMBED_ROWS = 8
COMPARED = ("architecture", "model_type", "hidden_size", "num_layers", "vocab_size", "sha256")


def _tensors(model: nn.Module, excluded: set[int]) -> Iterable[torch.Tensor]:
    embed = model.get_input_embeddings().weight
    if id(embed) not in excluded:
        yield embed[:EMBED_ROWS]
    stack = targets.blocks(model)
    for block in (stack[0], stack[-1]):
        for p in block.parameters():
            if p.ndim == 1 and p.is_floating_point() and id(p) not in excluded:
                yield p


def fingerprint(model: nn.Module, exclude: Iterable[torch.Tensor] = ()) -> dict:
    """Architecture, sizes and a short sha256 of a few base tensors (see the module docstring)."""
    cfg = model.config
    digest = hashlib.sha256()
    excluded = {id(t) for t in exclude}
    with torch.no_grad():
        for t in _tensors(model, excluded):
            digest.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return {"name": Path(getattr(cfg, "name_or_path", "") or "").name or None,  # for messages only
            "architecture": type(model).__name__, "model_type": getattr(cfg, "model_type", None),
            "hidden_size": getattr(cfg, "hidden_size", None), "num_layers": getattr(cfg, "num_hidden_layers", None),
            "vocab_size": getattr(cfg, "vocab_size", None), "sha256": digest.hexdigest()[:16]}


def describe(fp: dict) -> str:
    return (f"{fp.get('name') or 'a model'} ({fp.get('architecture')}, {fp.get('num_layers')} layers, hidden "
            f"{fp.get('hidden_size')}, vocab {fp.get('vocab_size')}, weights {fp.get('sha256')})")


def check(saved: dict, model: nn.Module, force: bool = False, exclude: Iterable[torch.Tensor] = (),
          where: str | None = None) -> None:
    """Raise a UserError naming both bases unless ``model`` is the base ``saved`` was made on (or ``force``)."""
    current = fingerprint(model, exclude)
    differ = [k for k in COMPARED if saved.get(k) != current.get(k)]
    if differ and not force:
        raise UserError(f"this adapter was made for {describe(saved)}, but the model is {describe(current)} "
                        f"(they differ in {', '.join(differ)})", where,
                        fix="load the base the adapter was trained on, or pass --force to load it anyway")
