"""Classification by label scoring: each label's answer word is scored by its log-likelihood after
the prompt, and the most likely label is the prediction (no free generation)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from tuneforge.eval.lm import IGNORE, Prefix, label_logprobs, length_batches, shared_prefix_of, token_logprobs


def _pad_right(rows: list[list[int]], value: int) -> Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


@torch.no_grad()
def score_labels(model: nn.Module, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 8,
                 pad_id: int = 0, batch_tokens: int | None = None) -> Tensor:
    """Log-likelihood of every answer after every prompt: a (n_prompts, n_answers) tensor.

    ``answers`` are token ids of each label's word. When every answer is one token, one forward
    pass per prompt scores all labels at once; otherwise each (prompt, answer) pair is scored.
    The tokens every prompt begins with (a chat template's system turn, the question) run once for the
    whole set; batches hold prompts of similar length, ``batch_size`` rows each or, given ``batch_tokens``,
    as many whole rows as fit in that many positions; only the label positions reach the head.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = torch.empty(len(prompts), len(answers))
    single = all(len(a) == 1 for a in answers)
    prefix = shared_prefix_of(model, prompts)
    pairs = [(i, None) for i in range(len(prompts))] if single else \
        [(i, j) for i in range(len(prompts)) for j in range(len(answers))]
    # whole rows: each row of a batch holds the shared beginning's keys and values too
    lengths = [len(prompts[i]) + len(answers[j or 0]) for i, j in pairs]
    for batch in length_batches(lengths, batch_size, batch_tokens):
        chunk = [pairs[k] for k in batch]
        if single:  # the label at the prompt's last position: a dummy target of the first answer
            seqs = [prompts[i] + answers[0] for i, _ in chunk]
            labels = [[IGNORE] * len(prompts[i]) + answers[0] for i, _ in chunk]
        else:
            seqs = [prompts[i] + answers[j] for i, j in chunk]
            labels = [[IGNORE] * len(prompts[i]) + answers[j] for i, j in chunk]
        ids, lab = _pad_right(seqs, pad_id).to(device), _pad_right(labels, IGNORE).to(device)
        mask = _pad_right([[1] * len(s) for s in seqs], 0).to(device)
        if single:
            scores[[i for i, _ in chunk]] = _next_token_logprobs(model, ids, mask, lab, [a[0] for a in answers],
                                                                 prefix)
        else:
            logprobs, rows = label_logprobs(model, ids, mask, lab, prefix=prefix)
            sums = torch.zeros(len(chunk), device=device).index_add_(0, rows, logprobs)
            for k, (i, j) in enumerate(chunk):
                scores[i, j] = sums[k].item()
    model.train(was_training)
    return scores


def _next_token_logprobs(model, ids, mask, labels, candidates: list[int], prefix: Prefix | None) -> Tensor:
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE  # exactly one position per row: the prompt's last
    targets = torch.tensor(candidates, device=ids.device).expand(int(keep.sum()), -1)  # (rows, labels)
    return token_logprobs(model, ids, mask, keep, targets, prefix=prefix).cpu()


@dataclass(frozen=True)
class ClassifyMetrics:
    accuracy: float
    macro_f1: float
    n: int
    confusion: list[list[int]]  # confusion[gold][predicted]

    @property
    def accuracy_ci95(self) -> tuple[float, float]:
        return wilson_interval(sum(row[i] for i, row in enumerate(self.confusion)), self.n)

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "accuracy_ci95": list(self.accuracy_ci95), "macro_f1": self.macro_f1,
                "n": self.n, "confusion": self.confusion}


def classification_metrics(predicted, gold, n_labels: int) -> ClassifyMetrics:
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    if len(gold) and (min(gold.min(), predicted.min()) < 0 or max(gold.max(), predicted.max()) >= n_labels):
        raise ValueError(f"labels must lie in 0..{n_labels - 1}")  # every row must count in n
    confusion = np.bincount(gold.astype(np.int64) * n_labels + predicted.astype(np.int64), minlength=n_labels ** 2)
    return metrics_from_confusion(confusion.reshape(n_labels, n_labels).tolist())  # [gold][predicted]


def metrics_from_confusion(confusion: list[list[int]]) -> ClassifyMetrics:
    """Accuracy and macro-F1 from a confusion matrix (confusion[gold][predicted]), so that parts
    scored separately combine exactly: sum their matrices. A label never predicted nor gold counts
    as F1 0, as scikit-learn's ``zero_division=0`` does."""
    c = np.asarray(confusion, dtype=np.int64)
    n = int(c.sum())
    tp = np.diag(c)
    wrong = c.sum(0) - tp + c.sum(1) - tp  # false positives plus false negatives, per label
    f1 = np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(len(c)), where=(2 * tp + wrong) > 0)
    return ClassifyMetrics(accuracy=float(tp.sum() / n) if n else 0.0, macro_f1=float(f1.mean()) if len(c) else 0.0,
                           n=n, confusion=c.tolist())


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for the default ``z``) of an accuracy of ``correct`` out of
    ``n``: how far a figure on a sample of this size can stray from the accuracy on the whole
    distribution."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def format_confusion(confusion: list[list[int]], names: list[str]) -> str:
    width = max(8, *(len(n) for n in names))
    head = " " * width + " | " + " ".join(f"{n:>{width}}" for n in names) + "   (rows: gold, columns: predicted)"
    rows = [f"{g:>{width}} | " + " ".join(f"{c:>{width}}" for c in row) for g, row in zip(names, confusion)]
    return "\n".join([head, *rows])
