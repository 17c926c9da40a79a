"""Direct Preference Optimization (Rafailov et al. 2023), as TRL's DPOTrainer computes it.

With the policy's and the reference's summed log-probabilities of each answer, delta = (chosen -
ref_chosen) - (rejected - ref_rejected):
- ``train.loss_type: sigmoid``: -log sigmoid(beta delta), or with ``train.label_smoothing`` e the
  conservative form -(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta);
- ``ipo`` (Azar et al. 2023): (delta' - 1 / (2 beta))^2, with each log-ratio divided by its answer's
  tokens (TRL's normalization).
At the first step the policy is the reference, so delta = 0 and the sigmoid loss is ln 2.
"""

from __future__ import annotations

from tuneforge.training.objectives import paired, pairs, preference_metrics, sequence_logprobs, sigmoid_loss

PAIRED, REFERENCE, GROUPED = True, True, False
units, examples = pairs, paired


def loss(model, batch: dict, cfg, reference, share: bool, stats: dict):
    n = pairs(batch)
    logps, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      share, stats, groups=2)
    ratios = logps - reference(batch, share)
    chosen, rejected = ratios[:n], ratios[n:]
    if cfg.loss_type == "ipo":
        delta = chosen / counts[:n].clamp(min=1) - rejected / counts[n:].clamp(min=1)
        losses = (delta - 1 / (2 * cfg.beta)) ** 2
    else:
        delta = cfg.beta * (chosen - rejected)
        losses = sigmoid_loss(delta, cfg.label_smoothing)
    return losses.sum(), preference_metrics(cfg.beta * chosen, cfg.beta * rejected, logps[:n], logps[n:])
