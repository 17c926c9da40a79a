"""Feature-based fine-tuning (a linear probe): the model stays frozen and a linear classifier learns
on its pooled hidden states. No gradient reaches the model, so the training loop is not used: one
forward pass per text gives its features, cached on disk so that a second fit, a sweep over C or a
layer search skips the model, and a logistic regression fits in seconds.

The features of a text at layer l are pool(h_l) over its tokens: h_0 is the embeddings, h_i block
i's output, and the last one is after the final norm (transformers' ``hidden_states``). ``mean``
averages the text's tokens; ``last`` takes its last token, the only position that has attended to
the whole text in a causal model. Each dimension is then standardized with the training set's mean
and spread: hidden states hold a few huge "massive activation" dimensions that would otherwise
dominate the L2 penalty and stall the solver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuneforge import targets
from tuneforge.errors import UserError
from tuneforge.io.atomic import atomic_dir, atomic_path
from tuneforge.io.fingerprint import check, fingerprint

PEFT_TYPE = None


@dataclass(frozen=True)
class Config:
    # hidden state to read: 0 = the embeddings, i = block i's output, -1 = the last (after the final
    # norm); "best": the one whose classifier scores best on a held-out fifth of the training texts
    layer: int | Literal["best"] = -1
    pooling: Literal["mean", "last"] = "mean"  # average the text's tokens, or take its last token
    # "logreg": scikit-learn's LogisticRegression; "torch": a linear head trained by full-batch AdamW
    classifier: Literal["logreg", "torch"] = "logreg"
    C: float = 1.0  # inverse strength of the L2 penalty, as scikit-learn's C
    max_iter: int = 1000  # solver iterations (torch: AdamW steps)
    batch_size: int = 16  # texts per forward pass
    max_length: int = 256  # tokens per text; a longer text is cut at the end

    def __post_init__(self):
        for key in ("C", "max_iter", "batch_size", "max_length"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be positive, got {getattr(self, key)}", f"method.{key}")


def _refuse(*_args):
    raise UserError("the features method trains a classifier on the frozen model's hidden states, not through "
                    "the training loop, so it has no parameters to inject, train, load or merge", "method.name",
                    fix="run it with `tuneforge train` (features.run) or features.train_features(...); "
                        "load a saved one with features.FeatureClassifier.load(folder)")


inject = trainable = state_dict = load_state_dict = merge = _refuse


def pool(hidden: Tensor, mask: Tensor, how: str) -> Tensor:  # (batch, seq, hidden), (batch, seq) -> (batch, hidden)
    if how == "last":  # right padding: the last real token sits at length - 1
        return hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1)


def _layer_index(model: nn.Module, layer: int) -> int:
    n = len(targets.blocks(model)) + 1  # the embeddings, then each block
    if not -n <= layer < n:
        raise UserError(f"layer {layer} is out of range: this model has hidden states 0 to {n - 1}", "method.layer",
                        fix=f"use an index from {-n} to {n - 1}, or \"best\"")
    return layer % n


def _token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    from tuneforge.data.text import eos_id

    # Raw text, no chat template; an empty text becomes one end token, so that it still has a feature.
    return [tokenizer(t)["input_ids"][:max_length] or [eos_id(tokenizer)] for t in texts]


def _key(model: nn.Module, ids: list[list[int]], cfg: Config) -> str:
    """sha256 of what decides the features but the layer: the base (its fingerprint, dtype and any
    injected method's tensors), the pooling and the exact token ids (so the tokenizer and max_length)."""
    digest = hashlib.sha256()
    head = {"model": fingerprint(model), "dtype": str(next(model.parameters()).dtype), "pooling": cfg.pooling}
    digest.update(json.dumps(head, sort_keys=True).encode())
    injected = getattr(model, "tuneforge_method", None)
    if injected is not None:  # the fingerprint reads only base tensors; an adapter changes the features too
        from tuneforge.methods import REGISTRY

        for name, t in sorted(REGISTRY[injected[0]].state_dict(model).items()):
            digest.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    for row in ids:
        digest.update(np.asarray(row, np.int64).tobytes() + b"|")
    return digest.hexdigest()


@torch.no_grad()
def _forward(model: nn.Module, ids: list[list[int]], layers: list[int], cfg: Config, pad_id: int) -> np.ndarray:
    from tuneforge.eval.lm import head_only_at

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
        with head_only_at(model, torch.zeros_like(mask, dtype=torch.bool)):  # the head sees no position: no logits
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                           use_cache=False).hidden_states
        for j, layer in enumerate(layers):
            h = hidden[layer][:, -width:].float()  # (batch, width, hidden): a method's virtual tokens come first
            pooled = pool(h, mask, cfg.pooling).cpu().numpy()
            if out is None:
                out = np.empty((len(layers), len(ids), pooled.shape[1]), np.float32)
            out[j, chunk] = pooled
    model.train(was_training)
    return out


def _cached(model, tokenizer, texts: list[str], layers: list[int], cfg: Config, cache_dir) -> tuple[np.ndarray, bool]:
    """(features (len(layers), n, hidden), whether they came from the cache). One file per layer, so a
    layer search (every layer in one pass) also fills the cache for a later run at one layer."""
    from tuneforge.io.load import cache_dir as default_cache

    if not texts:
        raise UserError("no texts to extract features from", fix="give at least one text")
    ids = _token_ids(tokenizer, list(texts), cfg.max_length)
    key = _key(model, ids, cfg)
    paths = [Path(cache_dir or default_cache() / "features") / f"{key}-layer{layer}.npy" for layer in layers]
    if all(path.is_file() for path in paths):
        return np.stack([np.load(path) for path in paths]), True
    features = _forward(model, ids, layers, cfg, tokenizer.pad_token_id)
    for path, layer_features in zip(paths, features):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # np.save on a path would append ".npy" to it
            np.save(f, layer_features)
    return features, False


def extract(model: nn.Module, tokenizer, texts: list[str], cfg: Config, cache_dir=None) -> np.ndarray:
    """Features (n, hidden) of ``texts``; with layer="best", (n_layers + 1, n, hidden): every hidden
    state. Cached as .npy under ``cache_dir`` (default: the tuneforge cache's features/ folder)."""
    if cfg.layer == "best":
        return _cached(model, tokenizer, texts, list(range(len(targets.blocks(model)) + 1)), cfg, cache_dir)[0]
    return _cached(model, tokenizer, texts, [_layer_index(model, cfg.layer)], cfg, cache_dir)[0][0]


@dataclass
class LinearHead:
    """A fitted linear classifier: z = (x - mean) / scale, s = z coef^T + intercept; the class is
    classes[s > 0] for one row of coef (scikit-learn's binary case), else classes[argmax s]."""

    coef: np.ndarray  # (1 or n_classes, hidden)
    intercept: np.ndarray  # (1 or n_classes,)
    classes: np.ndarray  # (n_classes,) int64: the label of each class
    mean: np.ndarray  # (hidden,)
    scale: np.ndarray  # (hidden,)

    def predict(self, features: np.ndarray) -> np.ndarray:
        s = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept  # (n, 1 or n_classes)
        return self.classes[(s[:, 0] > 0).astype(int) if s.shape[1] == 1 else s.argmax(1)]


def _fit_torch(z: np.ndarray, y: np.ndarray, n_classes: int, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression's objective over n texts, divided by C n: mean cross-entropy + |W|^2 / (2 C n).
    The penalty is in the loss, since AdamW's decoupled decay is not an L2 penalty."""
    x, t = torch.from_numpy(z), torch.from_numpy(y)
    head = nn.Linear(z.shape[1], n_classes)
    nn.init.zeros_(head.weight)  # a convex problem: starting at zero makes the fit deterministic
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(cfg.max_iter):
            loss = F.cross_entropy(head(x), t) + head.weight.square().sum() / (2 * cfg.C * len(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.weight.detach().numpy(), head.bias.detach().numpy()


def fit(features: np.ndarray, labels, cfg: Config) -> LinearHead:
    """A linear classifier on standardized ``features`` (n, hidden) for integer ``labels`` (n,)."""
    x, y = np.asarray(features, np.float32), np.asarray(labels, np.int64)
    classes = np.unique(y)
    if len(classes) < 2:
        raise UserError(f"the training texts have {len(classes)} label(s); a classifier needs two or more",
                        fix="give training data with every label")
    std = x.std(0)
    mean, scale = x.mean(0), np.where(std > 0, std, 1.0).astype(np.float32)
    z = (x - mean) / scale
    if cfg.classifier == "logreg":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit(z, y)
        coef, intercept = clf.coef_, clf.intercept_
    else:
        coef, intercept = _fit_torch(z, np.searchsorted(classes, y), len(classes), cfg)
    return LinearHead(coef.astype(np.float32), intercept.astype(np.float32), classes, mean, scale)


def best_layer(stack: np.ndarray, labels, cfg: Config) -> tuple[int, list[float]]:
    """The layer whose classifier is most accurate on a fixed, stratified fifth of the training texts
    (the lowest layer on ties), and every layer's accuracy. ``stack`` is (n_layers + 1, n, hidden)."""
    y = np.asarray(labels, np.int64)
    rng = np.random.default_rng(0)
    held = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: (y == c).sum() // 5] for c in np.unique(y)])
    rest = np.setdiff1d(np.arange(len(y)), held)
    if len(held) == 0:
        raise UserError(f"{len(y)} training texts are too few to choose a layer", "method.layer",
                        fix="give at least five texts of each label, or set layer to a number")
    accuracy = [float((fit(s[rest], y[rest], cfg).predict(s[held]) == y[held]).mean()) for s in stack]
    return int(np.argmax(accuracy)), accuracy


@dataclass
class FeatureClassifier:
    """The extraction settings (layer resolved to an index), the fitted head and the label names."""

    cfg: Config
    head: LinearHead
    labels: list[str]  # label names by class index
    base: dict | None = None  # fingerprint of the model the features came from

    def predict(self, model: nn.Module, tokenizer, texts: list[str], cache_dir=None) -> np.ndarray:
        """The label index of each text."""
        if self.base is not None:
            check(self.base, model, where="feature classifier")
        return self.head.predict(extract(model, tokenizer, texts, self.cfg, cache_dir))

    def save(self, out_dir) -> Path:
        """adapter_config.json ({"peft_type": null, "method": "features", ...}) and the head's tensors as
        adapter_model.safetensors, written atomically."""
        from safetensors.torch import save as safetensors_bytes

        from tuneforge.io.peft_format import CONFIG, WEIGHTS

        h = self.head
        tensors = {"coef": h.coef, "intercept": h.intercept, "classes": h.classes, "feature_mean": h.mean,
                   "feature_scale": h.scale}
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        info = json.dumps({"method": "features", "fingerprint": self.base})
        config = {"peft_type": None, "method": "features", **dataclasses.asdict(self.cfg), "labels": self.labels}
        with atomic_dir(out_dir) as tmp:
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            (tmp / WEIGHTS).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt", "tuneforge": info}))
        return Path(out_dir)

    @classmethod
    def load(cls, folder) -> "FeatureClassifier":
        from tuneforge.config import _Where, build
        from tuneforge.io.peft_format import CONFIG, read_config, read_weights

        folder = Path(folder)
        config, (sd, info) = read_config(folder), read_weights(folder)
        if config.get("method") != "features":
            raise UserError(f"this adapter was made with method {config.get('method')!r}, not features", str(folder),
                            fix="load it with tuneforge.io.peft_format.load_adapter")
        keys = {f.name for f in dataclasses.fields(Config)}
        cfg = build(Config, {k: v for k, v in config.items() if k in keys}, _Where(str(folder / CONFIG), {}, set()))
        try:
            head = LinearHead(*(sd[k].numpy() for k in ("coef", "intercept", "classes", "feature_mean",
                                                        "feature_scale")))
        except KeyError as exc:
            raise UserError(f"the classifier's tensor {exc} is missing", str(folder), fix="save it again") from None
        return cls(cfg, head, list(config.get("labels") or map(str, head.classes)), info.get("fingerprint"))


def _indices(labels, names: list[str] | None) -> tuple[list[int], list[str] | None]:
    """String labels become indices into ``names`` (default: the sorted labels); integers stay."""
    labels = list(labels)
    if labels and isinstance(labels[0], str):
        names = names or sorted(set(labels))
        return [names.index(label) for label in labels], names
    return [int(label) for label in labels], names


def train_features(model: nn.Module, tokenizer, train_texts: list[str], train_labels, eval_texts: list[str],
                   eval_labels, cfg: Config, label_names: list[str] | None = None,
                   cache_dir=None) -> tuple[FeatureClassifier, dict]:
    """Extract, fit and score: (the classifier, {accuracy, macro_f1, n, confusion, layer, seconds_extract,
    seconds_fit, cache_hit}). Labels are indices into ``label_names``, or strings."""
    from tuneforge.eval.classify import classification_metrics

    y, names = _indices(train_labels, label_names)
    y_eval, names = _indices(eval_labels, names)
    names = names or [str(i) for i in range(max(y + y_eval) + 1)]
    n_states = len(targets.blocks(model)) + 1
    layers = list(range(n_states)) if cfg.layer == "best" else [_layer_index(model, cfg.layer)]
    t0 = time.perf_counter()
    train_x, hit = _cached(model, tokenizer, train_texts, layers, cfg, cache_dir)
    t1 = time.perf_counter()
    layer, per_layer = best_layer(train_x, y, cfg) if cfg.layer == "best" else (layers[0], None)
    head = fit(train_x[layers.index(layer)], y, cfg)
    t2 = time.perf_counter()
    clf = FeatureClassifier(dataclasses.replace(cfg, layer=layer), head, names, fingerprint(model))
    metrics = {"layer": layer, "layer_accuracy": per_layer, "cache_hit": hit}
    if eval_texts:
        eval_x, eval_hit = _cached(model, tokenizer, eval_texts, [layer], cfg, cache_dir)
        m = classification_metrics(head.predict(eval_x[0]), y_eval, len(names))
        metrics.update(m.as_dict(), cache_hit=hit and eval_hit)
    seconds = {"seconds_extract": t1 - t0 + time.perf_counter() - t2, "seconds_fit": t2 - t1}
    return clf, {**metrics, **seconds}


def run(cfg, progress: bool = True) -> dict:
    """`tuneforge train` for this method: read the classification data, fit, write OUTPUT_DIR/final
    (the classifier) and OUTPUT_DIR/summary.json; returns the summary."""
    import sys

    from tuneforge import config as config_mod
    from tuneforge.data import load_datasets
    from tuneforge.io.atomic import write_text
    from tuneforge.io.load import load_model

    if cfg.data.format != "classification":
        raise UserError(f"the features method needs classification data, not {cfg.data.format!r}", "data.format",
                        fix="set data.format: classification (with text_column and label_column)")
    out = Path(cfg.train.output_dir)
    if (out / "final").exists():
        raise UserError("this output folder already holds a run", str(out), fix="set train.output_dir to a new folder")
    model, tokenizer = load_model(cfg.model, dtype="float32", device=cfg.train.device)
    data = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    config_mod.save(cfg, out / "config.yaml")
    if progress:
        print(f"tuneforge: features: {len(data.train_items)} training texts, {len(data.eval_items)} held out",
              file=sys.stderr)
    clf, metrics = train_features(model, tokenizer, [it.text for it in data.train_items],
                                  [it.label for it in data.train_items], [it.text for it in data.eval_items],
                                  [it.label for it in data.eval_items], config_mod.method_config(cfg),
                                  label_names=data.label_words)
    clf.save(out / "final")
    summary = {"method": "features", "train_examples": len(data.train_items), "eval_examples": len(data.eval_items),
               "trainable_parameters": int(clf.head.coef.size + clf.head.intercept.size), **metrics}
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary
