"""KTO (Ethayarajh et al. 2024) on answers marked desirable or not, as TRL's KTOTrainer computes it.

Each answer's log-ratio r = log pi - log ref; the reference point z is the batch's mean log-ratio on
mismatched prompt-answer rows (each example's prompt with another's answer), clamped at 0 and held
constant. A desirable answer's loss is ``train.desirable_weight`` (1 - sigmoid(beta (r - z))), an
undesirable one's ``train.undesirable_weight`` (1 - sigmoid(beta (z - r))); the loss is their mean."""

from __future__ import annotations

import torch

from tuneforge.data.preference import unpaired
from tuneforge.training.objectives import label_tokens, sequence_logprobs

PAIRED, REFERENCE = True, True
GROUPED = True  # its examples train in the blocks ``examples`` made: a batch's KL rows are its own answers


def examples(examples: list, cfg) -> list:
    """Pairs as two examples each, and every example with its KL row (TRL's pairing, in batches of
    ``train.batch_size``)."""
    return unpaired(examples, cfg.batch_size)


def units(batch: dict) -> int:
    return batch["input_ids"].shape[0] // 2  # each example has its answer row and its KL row


def tokens(batch: dict) -> int:  # the answers' tokens: the KL rows are scored without a gradient
    return label_tokens(batch, units(batch))


def loss(model, batch: dict, cfg, reference, share: bool, stats: dict):
    n = units(batch)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logps, _ = sequence_logprobs(model, ids[:n], mask[:n], labels[:n])
    with torch.no_grad():
        kl_logps, _ = sequence_logprobs(model, ids[n:], mask[n:], labels[n:])
    ref = reference(batch, False)
    z = (kl_logps - ref[n:]).mean().clamp(min=0)
    ratios = logps - ref[:n]
    good = batch["desirable"].bool()
    losses = torch.where(good, cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (ratios - z))),
                         cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (z - ratios))))
    # mean figures over the examples: a reward, signed by its label (so that it rises as KTO learns), and z
    signed = cfg.beta * ratios.detach() * (2 * good.float() - 1)
    return losses.sum(), {"rewards_signed": signed.sum().item(), "kl": n * z.item()}
