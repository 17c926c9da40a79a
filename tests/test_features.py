"""Feature-based fine-tuning on a tiny llama: pooling by hand, the on-disk feature cache, the linear
classifiers, save/load, layer choice, and the method's place in the config and REGISTRY."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tuneforge.config import from_dict
from tuneforge.errors import UserError
from tuneforge.methods import REGISTRY, features
from tuneforge.methods.features import Config, FeatureClassifier, extract, fit, train_features

from conftest import make_tiny_model

TEXTS = ["a short one", "a somewhat longer text here", "mid length", "x"]


def sentiment_task(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Texts that end in "good" (1) or "bad" (0) after random filler: separable by construction,
    since the two words share no byte and mean pooling keeps the embedding of every byte."""
    rng = random.Random(seed)
    fillers = ["the film", "this movie", "the plot", "acting", "the ending", "our evening", "that show"]
    labels = [i % 2 for i in range(n)]
    return [f"{rng.choice(fillers)} was {'good' if y else 'bad'}" for y in labels], labels


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_shape_and_layer_index(tiny, tmp_path, layer):
    model, tok = tiny
    x = extract(model, tok, TEXTS, Config(layer=layer, batch_size=3), tmp_path)
    assert x.shape == (len(TEXTS), 64) and x.dtype == np.float32
    if layer == 0:  # hidden state 0 is the embeddings: their plain mean
        ids = torch.tensor(tok(TEXTS[0])["input_ids"])
        torch.testing.assert_close(torch.from_numpy(x[0]), model.get_input_embeddings()(ids).mean(0))
    with pytest.raises(UserError, match="out of range"):
        extract(model, tok, TEXTS, Config(layer=3), tmp_path)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooling_by_hand_on_a_padded_batch(tiny, tmp_path, pooling):
    model, tok = tiny
    ids = [tok(t)["input_ids"] for t in TEXTS]
    width = max(map(len, ids))
    padded = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    with torch.no_grad():
        h = model(input_ids=padded, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    expected = torch.stack([h[i, :len(r)].mean(0) if pooling == "mean" else h[i, len(r) - 1]
                            for i, r in enumerate(ids)])
    got = extract(model, tok, TEXTS, Config(layer=1, pooling=pooling, batch_size=len(TEXTS)), tmp_path)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)
    # batched by length in twos: the same features, row for row in the input order
    again = extract(model, tok, TEXTS, Config(layer=1, pooling=pooling, batch_size=2), tmp_path / "other")
    np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-5)


def test_cache_hit_skips_the_model_and_key_follows_inputs(tiny, tmp_path):
    model, tok = tiny
    calls = count_forwards(model)
    cfg = Config(layer=1, batch_size=2)
    files = lambda: len(list(tmp_path.glob("*.npy")))  # noqa: E731
    first = extract(model, tok, TEXTS, cfg, tmp_path)
    assert calls[0] == 2 and files() == 1
    assert np.array_equal(extract(model, tok, TEXTS, cfg, tmp_path), first) and calls[0] == 2  # a hit: no forward
    _, metrics = train_features(model, tok, TEXTS, [0, 1, 0, 1], [], [], cfg, cache_dir=tmp_path)
    assert metrics["cache_hit"] and calls[0] == 2
    extract(model, tok, TEXTS[:3], cfg, tmp_path)  # other data
    extract(model, tok, TEXTS, Config(layer=2, batch_size=2), tmp_path)  # another layer
    extract(model, tok, TEXTS, Config(layer=1, pooling="last", batch_size=2), tmp_path)  # another pooling
    assert calls[0] == 8 and files() == 4
    extract(model, tok, TEXTS, Config(layer=-1, batch_size=2), tmp_path)  # -1 is layer 2: the same file
    assert calls[0] == 8
    every = extract(model, tok, TEXTS, Config(layer="best", batch_size=2), tmp_path)  # one pass, a file per layer
    assert calls[0] == 10 and files() == 5 and np.array_equal(every[1], first)  # layer 0 is new
    extract(make_tiny_model(len(tok), seed=1), tok, TEXTS, cfg, tmp_path)  # another base
    assert files() == 6


def test_logreg_separates_a_separable_task(tiny, tmp_path):
    model, tok = tiny
    texts, labels = sentiment_task(60)
    clf, m = train_features(model, tok, texts[:40], labels[:40], texts[40:], labels[40:], Config(layer=1),
                            cache_dir=tmp_path)
    assert m["accuracy"] >= 0.9 and m["n"] == 20 and not m["cache_hit"]
    assert m["seconds_extract"] > 0 and m["seconds_fit"] > 0
    # the head is scikit-learn's own decision rule, computed from the stored arrays
    from sklearn.linear_model import LogisticRegression

    x = extract(model, tok, texts, Config(layer=1), tmp_path)
    z = (x[:40] - x[:40].mean(0)) / np.where(x[:40].std(0) > 0, x[:40].std(0), 1)
    ref = LogisticRegression().fit(z, labels[:40])
    assert np.array_equal(clf.head.predict(x), ref.predict((x - clf.head.mean) / clf.head.scale))


def test_torch_head_agrees_with_logreg(tiny, tmp_path):
    model, tok = tiny
    texts, labels = sentiment_task(40)
    x = extract(model, tok, texts, Config(layer=1), tmp_path)
    a = fit(x, labels, Config(classifier="logreg")).predict(x)
    b = fit(x, labels, Config(classifier="torch", max_iter=300)).predict(x)
    assert (a == b).mean() >= 0.95 and (b == np.array(labels)).mean() >= 0.95


def test_one_class_is_an_error():
    with pytest.raises(UserError, match="two or more"):
        fit(np.zeros((3, 4)), [1, 1, 1], Config())


def test_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    texts, labels = sentiment_task(30)
    words = ["bad", "good"]
    clf, _ = train_features(model, tok, texts[:20], [words[y] for y in labels[:20]], texts[20:],
                            [words[y] for y in labels[20:]], Config(layer=-1, pooling="last"), cache_dir=tmp_path)
    assert clf.labels == words and clf.cfg.layer == 2  # -1 resolved
    clf.save(tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "adapter_config.json").read_text())
    assert config["peft_type"] is None and config["method"] == "features" and config["labels"] == words
    assert config["layer"] == 2 and config["pooling"] == "last"
    with safe_open(str(tmp_path / "clf" / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"coef", "intercept", "classes", "feature_mean", "feature_scale"}
    loaded = FeatureClassifier.load(tmp_path / "clf")
    assert loaded.cfg == clf.cfg and loaded.labels == words
    assert np.array_equal(loaded.predict(model, tok, texts, tmp_path), clf.predict(model, tok, texts, tmp_path))
    with pytest.raises(UserError, match="made for"):  # features of another base mean nothing to this head
        loaded.predict(make_tiny_model(len(tok), seed=3), tok, texts, tmp_path)


def test_best_layer(tiny, tmp_path):
    model, tok = tiny
    texts, labels = sentiment_task(40)
    assert extract(model, tok, texts, Config(layer="best"), tmp_path).shape == (3, 40, 64)
    clf, m = train_features(model, tok, texts, labels, texts[:4], labels[:4], Config(layer="best"), cache_dir=tmp_path)
    assert clf.cfg.layer == m["layer"] == int(np.argmax(m["layer_accuracy"])) and len(m["layer_accuracy"]) == 3


def test_config_and_registry():
    cfg = from_dict({"method": {"name": "features", "layer": "best", "C": 0.5}})
    assert REGISTRY["features"] is features and cfg.method.args["layer"] == "best" and cfg.method.args["C"] == 0.5
    with pytest.raises(UserError, match="pooling"):
        from_dict({"method": {"name": "features", "pooling": "max"}})
    with pytest.raises(UserError, match="C must be positive"):
        Config(C=0)


def test_protocol_functions_explain_themselves(tiny):
    for fn in (features.inject, features.trainable, features.merge):
        with pytest.raises(UserError, match="not through the training loop"):
            fn(tiny[0], Config())


def test_run_writes_classifier_and_summary(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))  # the features cache goes there
    texts, labels = sentiment_task(40)
    (tmp_path / "data.tsv").write_text("".join(f"{t}\t{['bad', 'good'][y]}\n" for t, y in zip(texts, labels)))
    cfg = from_dict({"model": str(tiny_dir), "method": {"name": "features", "layer": 1},
                     "data": {"path": str(tmp_path / "data.tsv"), "format": "classification",
                              "columns": ["text", "label"], "val_fraction": 0.25},
                     "train": {"output_dir": str(tmp_path / "run"), "device": "cpu"}})
    summary = features.run(cfg, progress=False)
    assert summary["train_examples"] == 30 and summary["eval_examples"] == 10 and summary["accuracy"] >= 0.9
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["layer"] == 1
    assert FeatureClassifier.load(tmp_path / "run" / "final").labels == ["bad", "good"]
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 2  # the training and held-out texts
    with pytest.raises(UserError, match="already holds a run"):
        features.run(cfg, progress=False)
