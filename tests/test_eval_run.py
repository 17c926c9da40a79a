"""`tuneforge eval --unseen`: exactly the rows a run never trains on, refused before any model loads."""

from __future__ import annotations

import json

import pytest

from tuneforge.core import config
from tuneforge.data import load_datasets
from tuneforge.core.errors import UserError
from tuneforge.eval.run import evaluate_file, unseen_parts


def write_scored(path, n, offset=0):
    """Score-labelled rows with a few between the thresholds (dropped before any cap)."""
    scores = [-2.0, 1.5, 0.0, -1.2, 2.5]
    path.write_text("".join(json.dumps({"text": f"review {offset + i}", "score": scores[i % 5]}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return str(path)


def run_config(path, **data):
    return config.from_dict({"model": "tiny", "data": {"path": path, "format": "classification",
                                                       "label_column": "score", "score_thresholds": [-1.0, 1.0],
                                                       **data}})


CASES = {
    "split_and_cap": {"val_fraction": 0.2, "max_examples": 10},
    "no_cap": {"val_fraction": 0.2},
    "no_split": {"val_fraction": 0.0, "max_examples": 10},
    "eval_file": {"max_examples": 10, "eval_path": "EVAL"},
}


@pytest.mark.parametrize("case", CASES)
def test_unseen_rows_are_exactly_the_kept_rows_the_run_does_not_train_on(case, tmp_path, tiny_tokenizer):
    path = write_scored(tmp_path / "d.jsonl", 50)
    data = dict(CASES[case], max_eval_examples=3)  # the eval cap must not shrink the unseen held-out part
    if data.get("eval_path") == "EVAL":
        data["eval_path"] = write_scored(tmp_path / "e.jsonl", 20, offset=1000)
    cfg = run_config(path, **data)
    trained = {item.text for item in load_datasets(cfg.data, tiny_tokenizer, seed=cfg.train.seed).train_items}
    parts = unseen_parts(cfg, path, tiny_tokenizer)
    held = [item.text for item in parts["held_out"].eval_items]
    unused = [item.text for item in parts["unused_training"].eval_items]
    assert not trained & set(held) and not trained & set(unused) and not set(held) & set(unused)
    kept = 40 + (16 if "eval_path" in data else 0)  # 4 of every 5 rows are outside (-1, 1)
    assert len(trained) + len(held) + len(unused) == kept
    assert len(unused) == (40 - len(trained) if "eval_path" in data else kept - len(trained) - len(held))
    assert len(trained) == (10 if "max_examples" in data else kept - len(held))
    if "eval_path" in data:
        assert all(int(text.split()[1]) >= 1000 for text in held)


@pytest.mark.parametrize("data, words", [({"format": "instruction"}, "format"),
                                         ({"val_fraction": 0.0}, "every row")])
def test_unseen_refuses_before_loading_any_model(data, words, tmp_path):
    cfg = run_config(write_scored(tmp_path / "d.jsonl", 10), **data)
    # the model spec names nothing: reaching the loader would fail differently
    with pytest.raises(UserError, match=words):
        evaluate_file(cfg, cfg.data.path, unseen=True)
