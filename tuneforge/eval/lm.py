"""Log-probabilities of the labelled tokens, computed as cheaply as the math allows:

- The output head sees only the positions that predict a label, and turns them into the labels'
  log-probabilities in chunks (``kernels.head_logprobs``): no (positions, vocabulary) logits anywhere.
- When the rows of a batch begin with the same tokens (a classification batch shares its chat
  template's system turn and the question: 29 of a mean 62 tokens on the sentiment task), that prefix
  runs once, with batch size 1; its keys and values are expanded to the batch for the rest of the
  sequence, and autograd sums the prefix's gradients over the rows. The loss and the gradients are
  those of the plain computation (to rounding). Dropout then draws one mask for the shared prefix
  instead of one per row. With gradient checkpointing (which drops caches) the plain path runs.

Both run only where the model's family allows them (``model/families.py``): the family is known, the
head's output is the logits, and the cache holds keys and values only. Any other model runs its own
forward, head and post-head transform included, asked for the kept positions' logits alone.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from tuneforge.model.families import family_of
from tuneforge.model.kernels import MIN_SHARED, head_logprobs, shared_prefix
from tuneforge.model.targets import output_head

IGNORE = -100


class _TargetHead(nn.Module):
    """Stands in for the output head: gathers the kept positions and returns their targets'
    log-probabilities (n_kept, k) under the real head, as the model's "logits"."""

    def __init__(self, head: nn.Module, keep: Tensor, targets: Tensor):
        super().__init__()
        self.head, self.keep, self.targets = head, keep, targets

    def forward(self, hidden: Tensor) -> Tensor:  # (batch, seq + n_virtual, hidden)
        mask = self.keep
        if hidden.shape[1] != mask.shape[1]:  # a method's virtual tokens come first, never kept
            mask = F.pad(mask, (hidden.shape[1] - mask.shape[1], 0), value=False)
        return head_logprobs(hidden[mask], self.head, self.targets)


@contextlib.contextmanager
def _targets_at(model: nn.Module, keep: Tensor, targets: Tensor) -> Iterator[None]:
    head = output_head(model)
    model.set_output_embeddings(_TargetHead(head, keep, targets))
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def _cache_keyword(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _own_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, keep: Tensor, targets: Tensor,
                  position_ids: Tensor | None = None) -> Tensor:
    """The model's own forward, head and whatever it applies after the head (a softcap, a scale), shown
    only the kept positions (``logits_to_keep`` as a boolean mask), then the targets' log-probabilities."""
    packed = {} if position_ids is None else {"position_ids": position_ids}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep,
                   **packed).logits
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets)  # (n_kept, vocab) -> (n_kept, k)


class Prefix(NamedTuple):
    """The model's keys and values for tokens that begin every row of an evaluation, computed once."""
    ids: list[int]
    cache: object  # transformers' cache, batch 1


@torch.no_grad()
def shared_prefix_of(model: nn.Module, rows: list[list[int]]) -> Prefix | None:
    """The keys and values of the leading tokens every one of ``rows`` shares (each row keeping one token of
    its own), where the model's family allows a shared prefix: one forward for a whole evaluation set, which
    every batch then continues. None where nothing is worth sharing."""
    family = family_of(model)
    if len(rows) < 2 or not (family.head_shortcut(model.config) and family.shared_prefix) or _checkpointing(model):
        return None
    first, n = rows[0], min(map(len, rows)) - 1
    for row in rows[1:]:
        n = next((i for i in range(n) if row[i] != first[i]), n)
    if n < MIN_SHARED:
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([first[:n]], device=device)
    none = torch.zeros((1, n), dtype=torch.bool, device=device)
    with _targets_at(model, none, torch.zeros((0, 1), dtype=torch.long, device=device)):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    return Prefix(first[:n], _cache_of(out))


def _cache_of(out) -> object:
    return next(getattr(out, k) for k in ("cache", "past_key_values") if getattr(out, k, None) is not None)


def token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, keep: Tensor, targets: Tensor,
                   share_prefix: bool = True, stats: dict | None = None, position_ids: Tensor | None = None,
                   prefix: Prefix | None = None) -> Tensor:
    """(n_kept, k) log-probabilities of ``targets`` (n_kept, k) at the positions where ``keep``
    (batch, seq) is True (row-major order). ``stats["shared_tokens"]`` counts the token positions a
    shared prefix saved. ``model`` may be under DistributedDataParallel, which then runs the forwards.

    The speed-ups (the head shortcut, the shared prefix) run where the model's family allows them
    (``model.families``); any other model runs its own forward, head and all. ``prefix`` (from
    ``shared_prefix_of``, under no_grad) holds the keys and values of the tokens every row begins with,
    computed once for many batches; otherwise the batch's own shared prefix runs once per batch.

    ``position_ids`` given, the rows are packed (``data.collate.PackingCollator``): the model gets them and
    no padding mask, so that transformers masks attention to each example's block, which it finds where
    the positions restart (a 2-D mask would turn that off); no prefix is shared across examples."""
    packed = {} if position_ids is None else {"position_ids": position_ids}
    if packed:
        attention_mask, share_prefix = None, False
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    family = family_of(inner)
    if not family.head_shortcut(inner.config):
        return _own_logprobs(model, input_ids, attention_mask, keep, targets, position_ids)
    share = share_prefix and family.shared_prefix and not _checkpointing(inner)
    batch = input_ids.shape[0]
    if prefix is not None and share:
        n, cache = len(prefix.ids), copy.deepcopy(prefix.cache)
        batch_ones = batch
    else:
        n = shared_prefix(input_ids, attention_mask, keep) if share else 0
        batch_ones = batch - 1
        if n:
            none = torch.zeros((1, n), dtype=torch.bool, device=keep.device)
            with _targets_at(inner, none, targets[:0]):  # the prefix predicts no target: no head work at all
                cache = _cache_of(model(input_ids=input_ids[:1, :n], attention_mask=attention_mask[:1, :n],
                                        use_cache=True))
    if not n:
        with _targets_at(inner, keep, targets):
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **packed).logits
    cache.batch_repeat_interleave(batch)  # (1, kv_heads, n, head_dim) -> (batch, kv_heads, n, head_dim) per layer
    if stats is not None:
        stats["shared_tokens"] = stats.get("shared_tokens", 0) + n * batch_ones
    with _targets_at(inner, keep[:, n:], targets):
        return model(input_ids=input_ids[:, n:], attention_mask=attention_mask, use_cache=False,
                     **{_cache_keyword(inner): cache}).logits


def label_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                   stats: dict | None = None, share_prefix: bool = True,
                   position_ids: Tensor | None = None, prefix: Prefix | None = None) -> tuple[Tensor, Tensor]:
    """Log-probability of each labelled token given what precedes it.

    Returns ``(logprobs, rows)``: both (n_labelled,), ``rows`` the batch row of each token.
    """
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE
    gold = targets[targets != IGNORE]
    logprobs = token_logprobs(model, input_ids, attention_mask, keep, gold[:, None], share_prefix, stats,
                              position_ids, prefix)[:, 0]
    return logprobs, keep.nonzero()[:, 0]


def label_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
               stats: dict | None = None, share_prefix: bool = True,
               position_ids: Tensor | None = None) -> tuple[Tensor, int]:
    """Summed cross-entropy over labelled tokens and their count (the caller normalizes, so that
    gradient accumulation gives the exact token-level mean)."""
    logprobs, _ = label_logprobs(model, input_ids, attention_mask, labels, stats, share_prefix, position_ids)
    return -logprobs.sum(), logprobs.numel()


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged model's loss does not overflow."""
    return math.exp(min(loss, 50.0))


def length_batches(lengths: Sequence[int], size: int, tokens: int | None = None) -> list[list[int]]:
    """Indices into ``lengths`` cut into batches of rows of similar length, shortest first: ``size`` rows
    each or, given ``tokens``, as many rows as fit in that many positions with the batch padded to its
    longest row (a row longer than ``tokens`` alone). Short rows then share a batch by the dozen, where a
    fixed count of rows would run them in small matmuls, and a batch of long rows holds no more positions
    than one of short rows."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if tokens is None:
        return [order[i:i + size] for i in range(0, len(order), size)]
    batches, batch = [], []
    for i in order:  # ascending, so the row joining a batch is its longest
        if batch and (len(batch) + 1) * lengths[i] > tokens:
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


@torch.no_grad()
def evaluate_lm(model: nn.Module, examples, collate, batch_size: int = 8, batch_tokens: int | None = None
                ) -> dict[str, float]:
    """Mean token loss and perplexity over ``examples`` (each with input_ids and labels), in batches of
    ``batch_size`` examples or, given ``batch_tokens``, of similar length up to that many positions."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for rows in length_batches([len(e.input_ids) for e in examples], batch_size, batch_tokens):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows]).items()}
        loss, n = label_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total, count = total + loss.item(), count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": count}
