"""ORPO (Hong et al. 2024): no reference; the chosen answer's cross-entropy plus beta (the paper's
lambda) times the log odds ratio of the chosen answer over the rejected one, as TRL's ORPOTrainer
computes it:
    loss = NLL(chosen) - beta log sigmoid(log odds(chosen) - log odds(rejected)),
odds(y) = p / (1 - p) with p the answer's mean token probability. As in TRL, the NLL is the token
mean over the whole chosen rows, prompt included."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.eval.lm import IGNORE
from tuneforge.training.objectives import paired, pairs, preference_metrics, sequence_logprobs

PAIRED, REFERENCE, GROUPED = True, False, False
units, examples = pairs, paired


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def loss(model, batch: dict, cfg, reference, share: bool, stats: dict):
    n = pairs(batch)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logps, counts = sequence_logprobs(model, ids, mask, labels, share, stats, groups=2)
    whole = torch.where(mask[:n].bool(), ids[:n], IGNORE)  # the chosen rows, prompt and all
    whole_logps, whole_counts = sequence_logprobs(model, ids[:n], mask[:n], whole)
    nll = -whole_logps.sum() / whole_counts.sum().clamp(min=1)
    means = logps / counts.clamp(min=1)
    log_odds = (means[:n] - means[n:]) - (log1mexp(means[:n]) - log1mexp(means[n:]))
    total = n * nll - (cfg.beta * F.logsigmoid(log_odds)).sum()
    metrics = preference_metrics(cfg.beta * means[:n], cfg.beta * means[n:], means[:n], means[n:])
    return total, {**metrics, "nll": n * nll.item()}
