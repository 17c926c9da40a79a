"""What a run measures on its held-out data, and which figure decides "best".

Classification data is scored by label: with a gradient method, each label word's log-likelihood
after the prompt (``score_labels``); with a probe (a feature classifier), its logits on the frozen
model's features. Either way the prediction is the top-scoring label, and the held-out loss is the
gold label's negative log-likelihood (per answer token, for label words). Other data gets the
language-model loss and perplexity. A gradient method's model is scored in the forward pass's own
context, the run's ``train.precision`` (autocast to bf16 on CUDA by default), as it was trained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tuneforge.core.config import RunCfg
from tuneforge.data import Collator, Datasets, word_ids
from tuneforge.eval.classify import classification_metrics, score_labels
from tuneforge.eval.lm import evaluate_lm, perplexity
from tuneforge.methods import feature_cache
from tuneforge.methods._shared import Probe, device_of
from tuneforge.model.devices import autocast


@dataclass(frozen=True)
class Evaluator:
    run: Callable[[nn.Module], dict]
    metric: str = "loss"
    higher_is_better: bool = False

    def better(self, new: float, old: float | None) -> bool:
        return old is None or (new > old if self.higher_is_better else new < old)


def make_evaluator(tokenizer, data: Datasets, cfg: RunCfg, probe: Probe | None = None) -> Evaluator | None:
    """Accuracy for classification data (by label words, or by ``probe`` when given), loss and
    perplexity otherwise; None when nothing is held out."""
    tokens = cfg.eval_batch_tokens
    if data.eval_items:
        items = data.eval_items
        gold = torch.tensor([it.label for it in items])
        if probe is None:
            answers = [word_ids(tokenizer, w, cfg.data.chat_template) for w in data.label_words]
            lengths = torch.tensor([len(a) for a in answers], dtype=torch.float32)

            def scores(model):  # (n, labels) log-likelihoods of each label word, and the gold one's per token
                s = score_labels(model, [it.prompt_ids for it in items], answers, cfg.eval.batch_size,
                                 tokenizer.pad_token_id, tokens)
                return s, s[torch.arange(len(gold)), gold] / lengths[gold]
        else:
            def scores(model):  # (n, labels) logits of the classifier, and the gold label's log-probability
                x, _ = feature_cache.extract(model, tokenizer, [it.text for it in items], probe.cfg)
                s = torch.from_numpy(probe.scores(x[0]))
                return s, s.log_softmax(-1)[torch.arange(len(gold)), gold]

        def run(model):
            s, gold_logprob = scores(model)
            m = classification_metrics(s.argmax(1).tolist(), gold.tolist(), len(data.label_words))
            loss = -gold_logprob.mean().item()
            return {"loss": loss, "perplexity": perplexity(loss), **m.as_dict()}

        precision = cfg.train.precision if probe is None else "fp32"  # a probe scores features in float32
        return Evaluator(_timed(run, len(items), precision), metric="accuracy", higher_is_better=True)
    if data.eval:
        return Evaluator(_timed(lambda model: evaluate_lm(model, data.eval, Collator(tokenizer.pad_token_id),
                                                          cfg.eval.batch_size, tokens), len(data.eval),
                                cfg.train.precision))
    return None


def _timed(run: Callable[[nn.Module], dict], n: int, precision: str) -> Callable[[nn.Module], dict]:
    """``run`` in ``precision``'s autocast, with its speed added: ``examples_per_second`` over the ``n``
    examples it scores."""
    def timed(model: nn.Module) -> dict:
        start = time.perf_counter()
        with autocast(precision, device_of(model)):
            metrics = run(model)
        return {**metrics, "examples_per_second": n / max(time.perf_counter() - start, 1e-9)}
    return timed
