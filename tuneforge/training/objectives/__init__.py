"""What a step's loss is: supervised fine-tuning (``sft``) or a preference objective (``dpo``, ``orpo``,
``simpo``, ``kto``), one small module each, chosen by ``train.objective``.

An objective module gives ``examples(examples, cfg)``, the examples in the form it trains on,
``units(batch)``, what its loss is a mean over (tokens that carry loss;
pairs; KTO's examples), and ``loss(model, batch, cfg, reference, share, stats)``, the micro-batch's
loss summed over those units and its metrics summed the same way. The loop divides both by the
step's units, so gradient accumulation gives the mean over the whole step. ``make`` binds an
objective to the run's settings and reference as the ``Loss`` the loop calls: the loop knows no
objective by name.

The reference of DPO and KTO is the model the training starts from: the same model with the
method switched off (``Injected.disabled``), or, for full fine-tuning, its log-probabilities computed
once before training (``reference.py``). ORPO and SimPO have none.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuneforge.core.config import TrainCfg
from tuneforge.core.errors import UserError
from tuneforge.data.preference import PreferencePair
from tuneforge.eval.evaluator import Evaluator
from tuneforge.eval.lm import IGNORE, token_logprobs
from tuneforge.model.devices import autocast

OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")

# reference(batch, share) -> (rows,) each row's summed log-probability under the reference
Reference = Callable[[dict, bool], Tensor]


@dataclass(frozen=True)
class Loss:
    """The loop's view of an objective: ``units(batch)`` and ``loss(model, batch, share, stats)`` ->
    (the loss summed over the units, {metric: its sum over the units})."""

    units: Callable[[dict], int]
    loss: Callable[[nn.Module, dict, bool, dict], tuple[Tensor, dict[str, float]]]
    name: str = "sft"
    paired: bool = False  # trains on preference pairs (or KTO's examples), not supervised rows
    reference: bool = False  # compares with a reference model
    tokens: Callable[[dict], int] | None = None  # the batch's tokens that carry loss (None: its labelled ones)

    def loss_tokens(self, batch: dict) -> int:
        """How many of ``batch``'s tokens carry loss: its units, where the loss is a mean over pairs or
        examples, count each answer's tokens."""
        return (self.tokens or label_tokens)(batch)


def module(name: str):
    return importlib.import_module(f"tuneforge.training.objectives.{name}")


def make(cfg: TrainCfg, reference: Reference | None = None) -> Loss:
    """``cfg.objective`` bound to ``cfg``'s settings and ``reference``."""
    objective = module(cfg.objective)
    return Loss(objective.units,
                lambda model, batch, share, stats: objective.loss(model, batch, cfg, reference, share, stats),
                cfg.objective, objective.PAIRED, objective.REFERENCE, getattr(objective, "tokens", None))


def label_tokens(batch: dict, rows: int | None = None) -> int:
    """The tokens of ``batch`` (of its first ``rows`` rows) that a label follows: those the loss is over."""
    return int((batch["labels"][:rows, 1:] != IGNORE).sum())


def sequence_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                      share: bool = False, stats: dict | None = None, groups: int = 1) -> tuple[Tensor, Tensor]:
    """(each row's summed log-probability of its labels, each row's count of labels), both (rows,).

    The rows of an example are ``i, i + n, ...`` (``groups`` of them: a pair's chosen and rejected).
    With ``share``, each example's rows run as one forward in which their shared prompt runs once;
    otherwise the whole batch runs as one."""
    rows = input_ids.shape[0]
    n = rows // groups
    chunks = [torch.arange(i, rows, n, device=input_ids.device) for i in range(n)] if share and groups > 1 \
        else [torch.arange(rows, device=input_ids.device)]
    total = torch.zeros(rows, device=input_ids.device)
    for index in chunks:
        width = int(attention_mask[index].sum(1).max())  # right-padded rows: drop the columns all pad
        ids, mask, lab = input_ids[index, :width], attention_mask[index, :width], labels[index, :width]
        targets = lab[:, 1:]
        keep = torch.zeros_like(lab, dtype=torch.bool)
        keep[:, :-1] = targets != IGNORE
        logprobs = token_logprobs(model, ids, mask, keep, targets[targets != IGNORE][:, None], share, stats)[:, 0]
        total = total.index_add(0, index[keep.nonzero()[:, 0]], logprobs.float())
    return total, (labels[:, 1:] != IGNORE).sum(1)


def sigmoid_loss(delta: Tensor, label_smoothing: float) -> Tensor:
    """-log sigmoid(delta), or with ``label_smoothing`` e the conservative form that takes a share e of
    the pairs to be flipped: -(1 - e) log sigmoid(delta) - e log sigmoid(-delta)."""
    return -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)


def preference_metrics(chosen: Tensor, rejected: Tensor, chosen_logps: Tensor, rejected_logps: Tensor) -> dict:
    """TRL's figures of a batch of pairs, summed over its pairs: the rewards of each answer, their margin,
    how often the chosen one's is higher, and the policy's log-probabilities (DPO: summed over each
    answer; ORPO and SimPO: its per-token mean, as TRL reports them)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"rewards_chosen": chosen.sum().item(), "rewards_rejected": rejected.sum().item(),
            "rewards_margin": (chosen - rejected).sum().item(),
            "rewards_accuracy": (chosen > rejected).float().sum().item(),
            "logps_chosen": chosen_logps.detach().sum().item(), "logps_rejected": rejected_logps.detach().sum().item()}


def data(cfg: TrainCfg, datasets):
    """``datasets`` with its examples in the form ``cfg.objective`` trains on."""
    objective = module(cfg.objective)
    return dataclasses.replace(datasets, train=objective.examples(datasets.train, cfg),
                               eval=objective.examples(datasets.eval, cfg))


def paired(examples: list, cfg: TrainCfg) -> list:
    """Pairs, as DPO, ORPO and SimPO take them: KTO's unpaired rows are refused."""
    if any(not isinstance(e, PreferencePair) for e in examples):
        raise UserError(f"{cfg.objective} trains on pairs (prompt, chosen, rejected), and these rows are KTO's "
                        "(prompt, completion, label)", "train.objective",
                        fix="set train.objective: kto, or give each prompt a chosen and a rejected answer")
    return examples


def pairs(batch: dict) -> int:
    """A batch of pairs holds each pair's two rows."""
    return batch["input_ids"].shape[0] // 2


def evaluator(loss: Loss, examples: list, collate, batch_size: int, precision: str):
    """The held-out figures of a preference objective: its loss and metrics, each a mean over the
    held-out pairs (or KTO's examples), computed as in training (in ``precision``, the run's
    ``train.precision``) but without gradients."""
    def run(model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total, units, sums = 0.0, 0, {}
        with torch.no_grad(), autocast(precision, device):
            for start in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
                value, figures = loss.loss(model, batch, True, {})
                total, units = total + value.item(), units + loss.units(batch)
                for key, v in figures.items():
                    sums[key] = sums.get(key, 0.0) + v
        model.train(was_training)
        return {"loss": total / max(units, 1), **{k: v / max(units, 1) for k, v in sums.items()}, "examples": units}

    return Evaluator(run)
