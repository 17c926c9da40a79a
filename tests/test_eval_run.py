"""`tuneforge eval`: a run's folder read as the run read its data; `--unseen`: exactly the rows a run never
trains on, refused before any model loads. And the command line's own surface: its version, and help
for every option."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, TIMING
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


@pytest.mark.parametrize("method", ["features", "lora"])
def test_a_run_folder_is_enough_to_evaluate_it(method, tmp_path, tiny_dir, capsys):
    """A feature classifier and a LoRA trained on classification rows are scored from their folder alone:
    the run's own config.yaml beside final/ says how to read the file, as --config would."""
    from test_reliability import config as run_yaml
    from test_run import sentiment_rows, write_jsonl

    from tuneforge import cli

    train = {"max_steps": 2, "eval_steps": 0, "save_steps": 0}
    cfg = run_yaml(tmp_path, tiny_dir, method="features", train=train) if method == "features" else \
        run_yaml(tmp_path, tiny_dir, train=train)
    assert cli.main(["train", str(cfg)]) == 0
    data = write_jsonl(tmp_path / "new.jsonl", sentiment_rows(6))
    scored = {}
    for given in ([], ["--config", str(tmp_path / "out" / "config.yaml")]):
        args = ["eval", "--model", str(tiny_dir), "--adapter", str(tmp_path / "out" / "final"), "--data", str(data),
                "--device", "cpu", "--json", str(tmp_path / "m.json"), *given]
        assert cli.main(args) == 0
        scored[bool(given)] = json.loads((tmp_path / "m.json").read_text())
    assert "the run's" in capsys.readouterr().err
    assert {**scored[False], **TIMING} == {**scored[True], **TIMING} and scored[False]["n"] == 12 and "accuracy" in scored[False]
    assert cli.main([*args[:-2], "--set", "eval.max_examples=3"]) == 0  # --set still wins over the run's config
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 3


def test_version_and_every_option_says_what_it_does(capsys):
    import re

    from tuneforge import __version__, cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"tuneforge {__version__}\n"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.*)"', pyproject, re.M).group(1) == __version__
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    silent = [f"{name} {action.dest}" for name, sub in commands.items() for action in sub._actions
              if not action.help and action.dest != "help"]
    assert not silent
    usage = commands["config"].format_usage()
    assert "CONFIG.yaml" in usage and " config\n" not in usage


@pytest.mark.parametrize("precision, dtype", [("auto", "float32"), ("bf16", "bfloat16")])
def test_a_model_is_evaluated_in_the_run_s_precision(precision, dtype, tmp_path, tiny):
    """The evaluator runs the forward pass in the context a training step runs it (bf16 autocast for a bf16
    run, none for fp32 on the CPU): its layers compute in that dtype, and the figures come out as numbers."""
    import torch

    from tuneforge.eval.evaluator import make_evaluator
    from tuneforge.methods import lora

    model, tokenizer = tiny
    lora.inject(model, lora.Config(r=4, target_modules="all-linear"))
    base = config.to_dict(run_config(write_scored(tmp_path / "d.jsonl", 30), val_fraction=0.3))
    cfg = config.from_dict({**base, "train": {**base["train"], "precision": precision}})
    data = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    seen = set()
    layer = model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda module, args, out: seen.add(str(out.dtype).removeprefix("torch.")))
    metrics = make_evaluator(tokenizer, data, cfg).run(model.eval())
    assert seen == {dtype}
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] == metrics["loss"] and not torch.is_autocast_enabled("cpu")
