"""Feature-based fine-tuning on a tiny llama: pooling by hand, the on-disk feature cache, the
classifier against scikit-learn's own, save/load through the adapter format, layer choice, the
probe protocol driven by `tuneforge train`, and `tuneforge eval` scoring a saved classifier."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.linear_model import LogisticRegression

from conftest import make_tiny_model
from tuneforge import cli
from tuneforge.core.config import from_dict
from tuneforge.core.errors import UserError
from tuneforge.methods import feature_cache
from tuneforge.io.peft_format import load_adapter, save_probe
from tuneforge.methods import features
from tuneforge.methods.features import Config, FeatureClassifier, fit

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


def extract(model, tok, texts, cfg, cache_dir):
    """The features of ``texts`` at the layers ``cfg`` asks for, through the cache."""
    return feature_cache.extract(model, tok, texts, cfg, cache_dir=cache_dir)[0]


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_shape_and_layer_index(tiny, tmp_path, layer):
    model, tok = tiny
    x = extract(model, tok, TEXTS, Config(layer=layer, batch_size=3), tmp_path)
    assert x.shape == (1, len(TEXTS), 64) and x.dtype == np.float32
    if layer == 0:  # hidden state 0 is the embeddings: their plain mean
        ids = torch.tensor(tok(TEXTS[0])["input_ids"])
        torch.testing.assert_close(torch.from_numpy(x[0, 0]), model.get_input_embeddings()(ids).mean(0))
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
    got = extract(model, tok, TEXTS, Config(layer=1, pooling=pooling, batch_size=len(TEXTS)), tmp_path)[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)
    # batched by length in twos: the same features, row for row in the input order
    again = extract(model, tok, TEXTS, Config(layer=1, pooling=pooling, batch_size=2), tmp_path / "other")[0]
    np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-5)


def test_cache_hit_skips_the_model_and_key_follows_inputs(tiny, tmp_path):
    model, tok = tiny
    calls = count_forwards(model)
    cfg = Config(layer=1, batch_size=2)
    files = lambda: len(list(tmp_path.glob("*.npy")))  # noqa: E731
    first, hit = feature_cache.extract(model, tok, TEXTS, cfg, cache_dir=tmp_path)
    assert calls[0] == 2 and files() == 1 and not hit
    again, hit = feature_cache.extract(model, tok, TEXTS, cfg, cache_dir=tmp_path)
    assert hit and np.array_equal(again, first) and calls[0] == 2  # a hit: no forward
    extract(model, tok, TEXTS[:3], cfg, tmp_path)  # other data
    extract(model, tok, TEXTS, Config(layer=2, batch_size=2), tmp_path)  # another layer
    extract(model, tok, TEXTS, Config(layer=1, pooling="last", batch_size=2), tmp_path)  # another pooling
    assert calls[0] == 8 and files() == 4
    extract(model, tok, TEXTS, Config(layer=-1, batch_size=2), tmp_path)  # -1 is layer 2: the same file
    assert calls[0] == 8
    every = extract(model, tok, TEXTS, Config(layer="best", batch_size=2), tmp_path)  # one pass, a file per layer
    assert calls[0] == 10 and files() == 5 and np.array_equal(every[1], first[0])  # layer 0 is new
    extract(make_tiny_model(len(tok), seed=1), tok, TEXTS, cfg, tmp_path)  # another base
    assert files() == 6


def test_the_classifier_is_scikit_learns_on_standardized_features(tiny, tmp_path):
    model, tok = tiny
    texts, labels = sentiment_task(60)
    x = extract(model, tok, texts, Config(layer=1), tmp_path)[0]
    clf = fit(x[None, :40], [1], labels[:40], Config(layer=1), ["bad", "good"])
    z = (x[:40] - x[:40].mean(0)) / np.where(x[:40].std(0) > 0, x[:40].std(0), 1)
    ref = LogisticRegression().fit(z, labels[:40])
    np.testing.assert_allclose(clf.scores(x)[:, 1], ref.decision_function((x - clf.mean) / clf.scale), rtol=1e-4,
                               atol=1e-4)
    assert np.array_equal(clf.predict(x), ref.predict((x - clf.mean) / clf.scale))
    assert (clf.predict(x[40:]) == np.array(labels[40:])).mean() >= 0.9  # separable by construction
    assert clf.parameter_count() == 64 + 1


def test_scores_cover_every_label_even_one_never_seen():
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    labels = [0, 2, 3] * 10  # label 1 has no training text
    clf = fit(x[None], [0], labels, Config(layer=0), ["a", "b", "c", "d"])
    scores = clf.scores(x)
    assert scores.shape == (30, 4) and np.isneginf(scores[:, 1]).all() and set(clf.predict(x)) <= {0, 2, 3}
    with pytest.raises(UserError, match="two or more"):
        fit(np.zeros((1, 3, 4)), [0], [1, 1, 1], Config(layer=0), ["a", "b"])


def test_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    texts, labels = sentiment_task(30)
    x = extract(model, tok, texts, Config(layer=-1, pooling="last"), tmp_path)
    clf = fit(x, features.layers(model, Config(layer=-1)), labels, Config(layer=-1, pooling="last"), ["bad", "good"],
              base=None)
    assert clf.cfg.layer == 2  # -1 resolved
    save_probe(features, clf, tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "adapter_config.json").read_text())
    assert config["peft_type"] is None and config["method"] == "features" and config["labels"] == ["bad", "good"]
    assert config["layer"] == 2 and config["pooling"] == "last"
    with safe_open(str(tmp_path / "clf" / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(features.TENSORS)
    loaded = load_adapter(model, tmp_path / "clf")
    assert isinstance(loaded, FeatureClassifier) and loaded.cfg == clf.cfg and loaded.labels == ["bad", "good"]
    assert np.array_equal(loaded.scores(x[0]), clf.scores(x[0]))
    assert not any(p.requires_grad is False for p in model.parameters())  # the model is left as it was


def test_a_classifier_for_another_base_is_refused(tiny, tmp_path, tiny_dir):
    from tuneforge.model.fingerprint import fingerprint

    model, tok = tiny
    texts, labels = sentiment_task(20)
    x = extract(model, tok, texts, Config(layer=1), tmp_path)
    save_probe(features, fit(x, [1], labels, Config(layer=1), ["bad", "good"], base=fingerprint(model)),
               tmp_path / "clf")
    with pytest.raises(UserError, match="made for"):
        load_adapter(make_tiny_model(len(tok), seed=3), tmp_path / "clf")


def test_best_layer(tiny, tmp_path):
    model, tok = tiny
    texts, labels = sentiment_task(40)
    layers = features.layers(model, Config(layer="best"))
    stack = extract(model, tok, texts, Config(layer="best"), tmp_path)
    assert layers == [0, 1, 2] and stack.shape == (3, 40, 64)
    clf = fit(stack, layers, labels, Config(layer="best"), ["bad", "good"])
    assert clf.cfg.layer == int(np.argmax(clf.layer_accuracy)) and len(clf.layer_accuracy) == 3
    assert clf.report() == {"layer": clf.cfg.layer, "layer_accuracy": clf.layer_accuracy}


def test_config():
    cfg = from_dict({"method": {"name": "features", "layer": "best", "C": 0.5}})
    assert cfg.method.args["layer"] == "best" and cfg.method.args["C"] == 0.5
    with pytest.raises(UserError, match="pooling"):
        from_dict({"method": {"name": "features", "pooling": "max"}})
    with pytest.raises(UserError, match="C must be above 0"):
        Config(C=0)


def write_task(tmp_path, n: int = 40):
    texts, labels = sentiment_task(n)  # numbered: a held-out text that is also a training text would be dropped
    (tmp_path / "data.tsv").write_text("".join(f"{i}. {t}\t{['bad', 'good'][y]}\n"
                                               for i, (t, y) in enumerate(zip(texts, labels))))
    return tmp_path / "data.tsv"


def test_train_fits_saves_and_eval_scores_the_classifier(tiny_dir, tmp_path, monkeypatch, capsys):
    """The same run driver and the same evaluation as every other method: `tuneforge train` writes
    config.yaml, final/ and summary.json; `tuneforge eval --adapter` scores the saved classifier and
    gives back the run's own held-out figures."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))  # the features cache goes there
    data = write_task(tmp_path)
    raw = {"model": str(tiny_dir), "method": {"name": "features", "layer": 1},
           "data": {"path": str(data), "format": "classification", "columns": ["text", "label"],
                    "val_fraction": 0.25},
           "train": {"output_dir": str(tmp_path / "run"), "device": "cpu"}}
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 0
    assert "fitted in" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "features" and summary["train_examples"] == 30 and summary["eval_examples"] == 10
    assert summary["after"]["accuracy"] >= 0.9 and summary["fit"]["layer"] == 1 and summary["artifact_bytes"] > 0
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"config.yaml", "final", "summary.json"}
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 2  # the training and held-out texts
    assert cli.main(["eval", "--config", str(tmp_path / "run.yaml"), "--adapter", str(tmp_path / "run" / "final"),
                     "--data", str(data), "--held-out", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 10 and metrics["accuracy"] == summary["after"]["accuracy"]
    assert metrics["loss"] == pytest.approx(summary["after"]["loss"], rel=1e-6)
    assert cli.main(["eval", "--model", str(tiny_dir), "--adapter", str(tmp_path / "run" / "final"),
                     "--data", str(data), "--set", "data.format=classification", "--set", "data.columns=[text,label]",
                     "--json", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["n"] == 40
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 2
    assert "already holds an earlier run" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tiny_dir), "--adapter", str(tmp_path / "run" / "final"),
                     "--prompt", "hi"]) == 2
    assert "does not generate" in capsys.readouterr().err


def test_a_probe_needs_classification_data(tiny_dir, tmp_path):
    from tuneforge.training.run import run

    (tmp_path / "t.txt").write_text("some plain text " * 50)
    cfg = from_dict({"model": str(tiny_dir), "method": {"name": "features"},
                     "data": {"path": str(tmp_path / "t.txt"), "max_length": 16},
                     "train": {"output_dir": str(tmp_path / "run"), "device": "cpu"}})
    with pytest.raises(UserError, match="features method fits a classifier and needs classification data"):
        run(cfg, progress=False)
