"""`tuneforge data CONFIG`: the counts, and examples with the tokens that carry loss marked, built as
training builds them."""

from __future__ import annotations

import json

from tuneforge import cli


def test_data_shows_the_counts_and_marks_exactly_the_trained_tokens(tiny_dir, tmp_path, capsys):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Goodbye."}]}] * 4
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_dir}\ndata: {{path: {data}, format: instruction, val_fraction: 0.25}}\n")
    assert cli.main(["data", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train: 3 rows -> 3 examples (0 dropped, 0 truncated)")
    # The held-out row is a copy of the training rows: dropped, and the line says why.
    assert "\neval: 1 rows -> 0 examples (1 dropped" in out and "also a training example" in out.splitlines()[1]
    shown = out.split("\n--- ", 1)[1]
    assert shown.startswith(f"{data}:") and "trained)" in shown.splitlines()[0]
    text = shown.split("\n", 1)[1]
    # Both answers and their end-of-turn tokens, nothing of the system or user turns.
    assert text.count("⟦") == 2 and "⟦Hello.<|im_end|>⟧" in text and "⟦Goodbye.<|im_end|>⟧" in text
    assert "⟦" not in text.split("Hello.")[0][:-1]
    assert "packing:" not in out
    assert cli.main(["data", str(config), "--set", "data.packing=true", "--set", "train.batch_size=2"]) == 0
    # the rows training makes: the three examples fit in one row of 512 tokens
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "packing: 3 examples in 1 rows of at most 512 tokens, 1 batches of 2 rows an epoch (unpacked: 2)")


def test_data_refuses_a_bad_config_in_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data: {path: nowhere.jsonl, format: instruction}\n")
    assert cli.main(["data", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere.jsonl" in err[0]


def test_data_refuses_rows_the_objective_does_not_train_on_as_train_does(tiny_dir, tmp_path, capsys):
    """KTO's unpaired rows under train.objective: dpo were shown as fine, and train refused them."""
    rows = [{"prompt": f"Q{i}: sky?", "completion": f" Blue {i}.", "label": bool(i % 2)} for i in range(8)]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_dir}\ndata: {{path: {data}, format: preference}}\ntrain: {{objective: dpo}}\n")
    assert cli.main(["data", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dpo trains on pairs" in err[0]
    assert cli.main(["data", str(config), "--set", "train.objective=kto"]) == 0
