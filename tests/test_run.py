"""Whole runs through the CLI on the tiny model: outputs, refusals, and bad input."""

import json
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import TIMING
from tuneforge import cli


def sentiment_rows(n=24):
    words = {"positive": "good fine great lovely", "negative": "bad awful poor dull"}
    return [{"text": f"{words[lab].split()[i % 4]} film number {i}", "label": lab}
            for i in range(n) for lab in ("positive", "negative")]


def write_config(tmp_path, data_path, **train):
    cfg = {"model": str(train.pop("model")), "method": {"name": "full"},
           "data": {"path": str(data_path), "format": "classification", "max_length": 256, "val_fraction": 0.25},
           "train": {"output_dir": str(tmp_path / "out"), "max_steps": 3, "batch_size": 4, "learning_rate": 1e-3,
                     "eval_at_start": True, **train}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_writes_config_metrics_checkpoint_and_a_loadable_model(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows())
    assert cli.main(["train", str(write_config(tmp_path, data, model=tiny_dir))]) == 0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoints", "final",
                                               "summary.json", "loss.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "accuracy" in summary["before"] and "accuracy" in summary["after"]
    low, high = summary["after"]["accuracy_ci95"]
    assert low <= summary["after"]["accuracy"] <= high
    out_text = capsys.readouterr().out
    assert f"accuracy's 95% interval {low:.4f} to {high:.4f} on 12); " in out_text
    speed = summary["after"]["examples_per_second"]  # the evaluation's own speed, in the summary and the log
    assert speed > 0 and re.search(r" after: .* on 12\); [0-9.]+ examples/s", out_text)
    AutoModelForCausalLM.from_pretrained(out / "final")  # a plain Hugging Face directory
    assert cli.main(["generate", "--model", str(out / "final"), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    # the same output folder again is refused (nothing is overwritten) ...
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 2
    assert "already holds an earlier run" in capsys.readouterr().err
    # ... and --resume finds the run complete and only rewrites its result
    assert cli.main(["train", str(tmp_path / "run.yaml"), "--resume"]) == 0


def test_eval_command_prints_and_writes_json(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(6))
    out = tmp_path / "m.json"
    assert cli.main(["eval", "--model", str(tiny_dir), "--data", str(data), "--set", "data.format=classification",
                     "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 12 and {"loss", "perplexity", "macro_f1"} <= set(metrics)
    for key, n in (("data.max_eval_examples", 12), ("eval.max_examples", 5)):  # a run's cap is not the file's
        assert cli.main(["eval", "--model", str(tiny_dir), "--data", str(data), "--set", "data.format=classification",
                         "--set", f"{key}=5", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["n"] == n, key
    # by hand: each label word's log-likelihood after the question, from a plain forward pass
    from tuneforge.data import classification_prompt, word_ids
    from tuneforge.io.load import load_model

    model, tok = load_model(str(tiny_dir))
    words = ["negative", "positive"]
    correct = 0
    for row in sentiment_rows(6):
        prompt = classification_prompt(tok, row["text"], None, words)
        scores = []
        for word in words:
            answer = word_ids(tok, word)
            with torch.no_grad():
                logp = model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
            scores.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(answer)))
        correct += words[scores.index(max(scores))] == row["label"]
    assert metrics["accuracy"] == pytest.approx(correct / 12)
    assert "rows: gold" in capsys.readouterr().out
    text = tmp_path / "t.txt"
    text.write_text("some plain text to score " * 40)
    assert cli.main(["eval", "--model", str(tiny_dir), "--data", str(text), "--set", "data.max_length=32",
                     "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {"loss", "perplexity", "tokens", "n", "examples_per_second"}


BAD_INPUTS = {
    "bad_json": ('{"text": "ok", "label": "positive"}\n{"text": "broken\n', "d.jsonl:2", "JSON"),
    "missing_field": ('{"text": "ok", "label": "positive"}\n{"txt": "no", "label": "negative"}\n', "d.jsonl:2",
                      "text"),
    "empty_file": ("", "d.jsonl", "empty"),
    "label_outside_verbalizer": (None, "d.jsonl:", "neutral"),
    "not_utf8": (b'{"text": "ok", "label": "positive"}\n{"text": "caf\xe9", "label": "negative"}\n', "d.jsonl:2",
                 "UTF-8"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_leaves_no_output(case, tmp_path, tiny_dir, capsys):
    content, where, words = BAD_INPUTS[case]
    path = tmp_path / "d.jsonl"
    extra = {}
    if case == "label_outside_verbalizer":
        write_jsonl(path, sentiment_rows(4) + [{"text": "meh", "label": "neutral"}])
        extra = {"verbalizer": {"positive": "positive", "negative": "negative"}}
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    cfg = write_config(tmp_path, path, model=tiny_dir)
    if extra:
        raw = yaml.safe_load(cfg.read_text())
        raw["data"].update(extra)
        cfg.write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert where in err and words.lower() in err.lower()
    assert not (tmp_path / "out").exists()


def test_lora_run_then_eval_generate_and_merge_with_the_adapter(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows())
    cfg = write_config(tmp_path, data, model=tiny_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["method"] = {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    cfg.write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(cfg)]) == 0
    adapter = tmp_path / "out" / "final"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert cli.main(["eval", "--model", str(tiny_dir), "--adapter", str(adapter), "--data", str(data),
                     "--set", "data.format=classification"]) == 0
    # --held-out scores exactly the run's own held-out split: the run's final figures come back
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert cli.main(["eval", "--config", str(cfg), "--adapter", str(adapter), "--data", str(data), "--held-out",
                     "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == summary["eval_examples"] == 12
    assert metrics["loss"] == pytest.approx(summary["after"]["loss"], rel=1e-5)
    assert metrics["accuracy"] == summary["after"]["accuracy"]
    # --unseen: that held-out split whole, plus the training rows past data.max_examples (set to 20 here,
    # of 36, to give the second part rows; tests/test_eval_run.py checks which rows)
    assert cli.main(["eval", "--config", str(cfg), "--adapter", str(adapter), "--data", str(data), "--unseen",
                     "--set", "data.max_examples=20", "--json", str(tmp_path / "u.json")]) == 0
    unseen = json.loads((tmp_path / "u.json").read_text())
    parts = unseen["parts"]
    assert parts["held_out"]["n"] == 12 and parts["unused_training"]["n"] == 16 and unseen["n"] == 28
    assert parts["held_out"]["accuracy"] == metrics["accuracy"]
    assert parts["held_out"]["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    assert unseen["accuracy"] == pytest.approx((12 * metrics["accuracy"] + 16 * parts["unused_training"]["accuracy"])
                                               / 28)
    assert unseen["accuracy_ci95"][0] <= unseen["accuracy"] <= unseen["accuracy_ci95"][1]
    assert "unused_training" in capsys.readouterr().out
    assert cli.main(["eval", "--config", str(cfg), "--data", str(data), "--unseen", "--held-out"]) == 2
    err = capsys.readouterr().err
    assert "--held-out and --unseen" in err and err.count("\n") == 1
    assert cli.main(["generate", "--model", str(tiny_dir), "--adapter", str(adapter), "--prompt", "hi",
                     "--max-new-tokens", "2"]) == 0
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(tiny_dir), "--adapter", str(adapter), "--out", str(merged)]) == 0

    from tuneforge.io.load import load_model
    from tuneforge.io.peft_format import load_adapter

    ids = torch.tensor([[5, 6, 7, 8]])
    with_adapter = load_model(str(tiny_dir))[0]
    load_adapter(with_adapter, adapter)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.testing.assert_close(plain(ids).logits, with_adapter(ids).logits, rtol=1e-5, atol=1e-5)


def test_estimate_command(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows())
    assert cli.main(["estimate", str(write_config(tmp_path, data, model=tiny_dir))]) == 0
    assert "trainable" in capsys.readouterr().out


def test_the_python_api_trains_twice_in_one_process_and_takes_a_model_you_injected(tmp_path, tiny_dir):
    """tuneforge.train is a function whatever was imported before it (the package that holds the loop is
    tuneforge.training), so a second run in one process works, and with the same seed gives the same adapter."""
    import tuneforge
    from safetensors.torch import load_file

    from tuneforge.core import config

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(8))

    def cfg(out: str):
        return config.from_dict({"model": str(tiny_dir), "method": {"name": "lora", "r": 4},
                                 "data": {"path": str(data), "format": "classification", "val_fraction": 0.25},
                                 "train": {"output_dir": str(tmp_path / out), "max_steps": 3, "batch_size": 4,
                                           "learning_rate": 1e-2, "device": "cpu"}})

    first, second = tuneforge.train(cfg("a"), progress=False), tuneforge.train(cfg("b"), progress=False)
    assert first["steps"] == second["steps"] == 3 and {**first["after"], **TIMING} == {**second["after"],
                                                                                     **TIMING}
    a, b = (load_file(tmp_path / out / "final" / "adapter_model.safetensors") for out in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # it trained

    model, tokenizer = tuneforge.load_model(str(tiny_dir), device="cpu")
    lora = tuneforge.get_method("lora")
    adapter = lora.inject(model, lora.Config(r=2, target_modules=["k_proj"]))
    third = tuneforge.train(cfg("c"), progress=False, model=model, tokenizer=tokenizer, injected=adapter)
    assert third["trainable_parameters"] == sum(p.numel() for p in adapter.trainable(model).values())
    recorded = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["method"]
    assert recorded["name"] == "lora" and recorded["r"] == 2 and recorded["target_modules"] == ["k_proj"]
    fresh = tuneforge.load_model(str(tiny_dir), device="cpu")[0]
    assert tuneforge.load_adapter(fresh, tmp_path / "c" / "final").cfg == adapter.cfg


def test_resuming_a_finished_run_trains_nothing_and_reports_the_run_s_rate(tmp_path, tiny_dir, capsys):
    """It printed "2 steps, N tokens in 1 s (0 tokens/s)": the rate of a session that trained nothing."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows())
    config = str(write_config(tmp_path, data, model=tiny_dir, max_steps=2, save_steps=2))
    assert cli.main(["train", config]) == 0
    capsys.readouterr()
    assert cli.main(["train", config, "--resume"]) == 0
    summary = [line for line in capsys.readouterr().out.splitlines() if " tokens/s)" in line]
    assert len(summary) == 1 and summary[0].startswith("2 steps,") and " (0 tokens/s)" not in summary[0], summary
