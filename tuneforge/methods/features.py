"""Feature-based fine-tuning (a linear probe): the model stays frozen and a logistic regression
learns on its pooled hidden states. No gradient reaches the model, so this is a ``ProbeMethod``, not
a gradient method: the run driver extracts the features (``extract``, cached on disk by
``tuneforge.methods.feature_cache`` so that a second fit or a layer search skips the model), ``fit``
returns a ``FeatureClassifier``, and evaluation scores texts with its ``scores``.

The features of a text at layer l are pool(h_l) over its tokens: h_0 is the embeddings, h_i block
i's output, and the last one is after the final norm (transformers' ``hidden_states``). ``mean``
averages the text's tokens; ``last`` takes its last token, the only position that has attended to
the whole text in a causal model. Each dimension is then standardized with the training set's mean
and spread: hidden states hold a few huge "massive activation" dimensions that would otherwise
dominate the L2 penalty and stall the solver.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from tuneforge.model import targets
from tuneforge.data.text import eos_id
from tuneforge.core.errors import UserError
from tuneforge.core.config.methods import FeaturesConfig as Config

NAME, KIND, PEFT_TYPE = "features", "probe", None
TENSORS = ("coef", "intercept", "classes", "feature_mean", "feature_scale")  # the saved classifier


def pool(hidden: Tensor, mask: Tensor, how: str) -> Tensor:  # (batch, seq, hidden), (batch, seq) -> (batch, hidden)
    if how == "last":  # right padding: the last real token sits at length - 1
        return hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1)


def layer_index(model: nn.Module, layer: int) -> int:
    n = len(targets.blocks(model)) + 1  # the embeddings, then each block
    if not -n <= layer < n:
        raise UserError(f"layer {layer} is out of range: this model has hidden states 0 to {n - 1}", "method.layer",
                        fix=f"use an index from {-n} to {n - 1}, or \"best\"")
    return layer % n


def layers(model: nn.Module, cfg: Config) -> list[int]:
    """The hidden states ``fit`` needs: every one to choose the best, else the one asked for."""
    if cfg.layer == "best":
        return list(range(len(targets.blocks(model)) + 1))
    return [layer_index(model, cfg.layer)]


def token_ids(tokenizer, texts: list[str], cfg: Config) -> list[list[int]]:
    """Raw text, no chat template, cut to max_length; an empty text becomes one end token, so that it
    still has a feature."""
    if not texts:
        raise UserError("no texts to extract features from", fix="give at least one text")
    return [tokenizer(t)["input_ids"][:cfg.max_length] or [eos_id(tokenizer)] for t in texts]


@torch.no_grad()
def extract(model: nn.Module, ids: list[list[int]], layer_list: list[int], cfg: Config, pad_id: int) -> np.ndarray:
    """(len(layer_list), n, hidden) float32: each text's pooled hidden state at each layer."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch: little padding
    out = None
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start:start + cfg.batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.tensor([ids[i] + [pad_id] * (width - len(ids[i])) for i in chunk], device=device)
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in chunk], device=device)
        with targets.head_only_at(model, torch.zeros_like(mask, dtype=torch.bool)):  # the head sees no position
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                           use_cache=False).hidden_states
        for j, layer in enumerate(layer_list):
            h = hidden[layer][:, -width:].float()  # (batch, width, hidden): a method's virtual tokens come first
            pooled = pool(h, mask, cfg.pooling).cpu().numpy()
            if out is None:
                out = np.empty((len(layer_list), len(ids), pooled.shape[1]), np.float32)
            out[j, chunk] = pooled
    model.train(was_training)
    return out


@dataclass
class FeatureClassifier:
    """A fitted linear classifier: z = (x - mean) / scale, s = z coef^T + intercept. With one row of
    coef (scikit-learn's binary case) the class is classes[s > 0]; else classes[argmax s]."""

    cfg: Config  # the layer resolved to an index
    coef: np.ndarray  # (1 or n_classes, hidden)
    intercept: np.ndarray  # (1 or n_classes,)
    classes: np.ndarray  # (n_classes,) int64: the label index of each class
    mean: np.ndarray  # (hidden,)
    scale: np.ndarray  # (hidden,)
    labels: list[str]  # label names by label index
    base: dict | None = None  # fingerprint of the model the features came from
    layer_accuracy: list[float] | None = None  # with layer "best": each layer's held-out accuracy (not saved)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(n, len(labels)) logits; a label the classifier never saw scores -inf."""
        s = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept  # (n, 1 or n_classes)
        if s.shape[1] == 1:  # binary: the logit of the second class against the first
            s = np.concatenate([np.zeros_like(s), s], axis=1)
        out = np.full((len(features), len(self.labels)), -np.inf, np.float32)
        out[:, self.classes] = s
        return out

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.scores(features).argmax(1)

    def parameter_count(self) -> int:
        return int(self.coef.size + self.intercept.size)

    def report(self) -> dict:
        return {"layer": self.cfg.layer, "layer_accuracy": self.layer_accuracy}

    def state_dict(self) -> dict[str, Tensor]:
        arrays = (self.coef, self.intercept, self.classes, self.mean, self.scale)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in zip(TENSORS, arrays)}


def from_state_dict(cfg: Config, sd: dict[str, Tensor], labels: list[str], base: dict | None) -> FeatureClassifier:
    if missing := [k for k in TENSORS if k not in sd]:
        raise UserError(f"the classifier's tensor {missing[0]!r} is missing", fix="save the classifier again")
    return FeatureClassifier(cfg, *(sd[k].numpy() for k in TENSORS), labels=labels, base=base)


def fit_head(features: np.ndarray, labels, cfg: Config) -> tuple[np.ndarray, ...]:
    """(coef, intercept, classes, mean, scale): a logistic regression on standardized ``features``."""
    x, y = np.asarray(features, np.float32), np.asarray(labels, np.int64)
    classes = np.unique(y)
    if len(classes) < 2:
        raise UserError(f"the training texts have {len(classes)} label(s); a classifier needs two or more",
                        fix="give training data with every label")
    from sklearn.linear_model import LogisticRegression  # a second's import, paid only when fitting

    std = x.std(0)
    mean, scale = x.mean(0), np.where(std > 0, std, 1.0).astype(np.float32)
    clf = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit((x - mean) / scale, y)
    return clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32), classes, mean, scale


def best_layer(stack: np.ndarray, labels, cfg: Config) -> tuple[int, list[float]]:
    """The index into ``stack`` (n_layers, n, hidden) whose classifier is most accurate on a fixed,
    stratified fifth of the training texts (the lowest on ties), and every layer's accuracy."""
    y = np.asarray(labels, np.int64)
    rng = np.random.default_rng(0)
    held = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: (y == c).sum() // 5] for c in np.unique(y)])
    rest = np.setdiff1d(np.arange(len(y)), held)
    if len(held) == 0:
        raise UserError(f"{len(y)} training texts are too few to choose a layer", "method.layer",
                        fix="give at least five texts of each label, or set layer to a number")
    names = [str(c) for c in range(int(y.max()) + 1)]
    accuracy = [float((FeatureClassifier(cfg, *fit_head(s[rest], y[rest], cfg), names).predict(s[held]) == y[held])
                      .mean()) for s in stack]
    return int(np.argmax(accuracy)), accuracy


def fit(stack: np.ndarray, layer_list: list[int], labels, cfg: Config, label_names: list[str],
        base: dict | None = None) -> FeatureClassifier:
    """A classifier on ``stack`` (len(layer_list), n, hidden) for ``labels`` (n,) indices into
    ``label_names``; with layer "best" the layer is chosen first (``layer_accuracy`` records each)."""
    index, accuracy = best_layer(stack, labels, cfg) if len(layer_list) > 1 else (0, None)
    return FeatureClassifier(replace(cfg, layer=layer_list[index]), *fit_head(stack[index], labels, cfg),
                             labels=list(label_names), base=base, layer_accuracy=accuracy)
