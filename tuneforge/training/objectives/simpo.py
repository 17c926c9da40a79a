"""SimPO (Meng et al. 2024): no reference; each answer's reward is beta times its mean token
log-probability, and the chosen one must lead by a margin gamma:
-log sigmoid(beta (mean_chosen - mean_rejected) - gamma), as TRL's CPOTrainer (loss_type simpo)
computes it, with ``train.label_smoothing`` as there. ``train.cpo_alpha`` adds that much of the chosen
answers' cross-entropy (CPO's term; 0 is SimPO's own loss)."""

from __future__ import annotations

from tuneforge.training.objectives import paired, pairs, preference_metrics, sequence_logprobs, sigmoid_loss

PAIRED, REFERENCE, GROUPED = True, False, False
units, examples = pairs, paired


def loss(model, batch: dict, cfg, reference, share: bool, stats: dict):
    n = pairs(batch)
    logps, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      share, stats, groups=2)
    means = logps / counts.clamp(min=1)
    delta = cfg.beta * (means[:n] - means[n:] - cfg.simpo_gamma / cfg.beta)
    losses = sigmoid_loss(delta, cfg.label_smoothing)
    total = losses.sum()
    if cfg.cpo_alpha:  # the chosen answers' token mean cross-entropy, once per pair
        total = total + cfg.cpo_alpha * n * (-logps[:n].sum() / counts[:n].sum().clamp(min=1))
    return total, preference_metrics(cfg.beta * means[:n], cfg.beta * means[n:], means[:n], means[n:])
