"""Language-model loss where labels are set, without full-vocabulary logits anywhere else: the
output head is given only the positions that predict a label (``targets.head_only_at``), so the
model's own forward (and any method attached to it) runs unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuneforge.targets import head_only_at

IGNORE = -100


def label_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each labelled token given what precedes it.

    Returns ``(logprobs, rows)``: both (n_labelled,), ``rows`` the batch row of each token.
    """
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE
    with head_only_at(model, keep):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (n, vocab)
    gold = targets[targets != IGNORE]
    logprobs = -F.cross_entropy(logits.float(), gold, reduction="none")
    rows = keep.nonzero()[:, 0]
    return logprobs, rows


def label_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy over labelled tokens and their count (the caller normalizes, so that
    gradient accumulation gives the exact token-level mean)."""
    logprobs, _ = label_logprobs(model, input_ids, attention_mask, labels)
    return -logprobs.sum(), logprobs.numel()


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged model's loss does not overflow."""
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def evaluate_lm(model: nn.Module, examples, collate, batch_size: int = 8) -> dict[str, float]:
    """Mean token loss and perplexity over ``examples`` (each with input_ids and labels)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
        loss, n = label_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total, count = total + loss.item(), count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": count}
