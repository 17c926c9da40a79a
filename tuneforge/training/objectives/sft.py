"""Supervised fine-tuning: the mean cross-entropy of the tokens that carry loss."""

from __future__ import annotations

from tuneforge.eval.lm import IGNORE, label_loss

PAIRED, REFERENCE, GROUPED = False, False, False


def examples(examples: list, cfg) -> list:
    return examples


def units(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss(model, batch: dict, cfg, reference, share: bool, stats: dict):
    total, _ = label_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], stats,
                          share_prefix=share, position_ids=batch.get("position_ids"))
    return total, {}
