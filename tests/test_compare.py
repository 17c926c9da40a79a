"""`tuneforge compare` on the tiny model: every row reported, a failing one included; every row checked
before the first runs."""

import csv
import json

import pytest
import yaml

from tuneforge import cli
from test_run import sentiment_rows, write_jsonl


def test_compare_writes_table_and_chart_and_survives_a_failing_method(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(16))
    transfer = write_jsonl(tmp_path / "t.jsonl", sentiment_rows(4))
    cfg = {"model": str(tiny_dir),
           "data": {"path": str(data), "format": "classification", "max_length": 256, "val_fraction": 0.25},
           "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
           "compare": {"output_dir": str(tmp_path / "cmp"), "transfer_path": str(transfer),
                       "methods": [{"name": "zero-shot"},
                                   {"name": "lora", "r": 2, "target_modules": ["no_such_layer"], "label": "broken"},
                                   {"name": "lora", "r": 2, "target_modules": "all-linear"},
                                   {"name": "features", "layer": 1}]}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["compare", str(path)]) == 1  # a row failed: the table is written, and the exit code says so
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("tuneforge: error:") and "1 of 4 rows failed: 'broken' (" in line
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [r["label"] for r in rows] == ["zero-shot", "broken", "lora r=2 target_modules=all-linear", "features layer=1"]
    broken = rows[1]
    assert "no_such_layer" in broken["error"] and broken["accuracy"] == ""
    for r in (rows[0], rows[2], rows[3]):
        assert r["error"] == "" and r["transfer_accuracy"] != "" and float(r["peak_memory_mb"]) > 0
    for i in (2, 3):  # a trained row reports its own run's held-out accuracy, and its artifact on the second domain
        folder = next((tmp_path / "cmp").glob(f"{i:02d}-*"))
        summary = json.loads((folder / "summary.json").read_text())
        assert float(rows[i]["accuracy"]) == pytest.approx(summary["after"]["accuracy"], abs=5e-5)
        assert cli.main(["eval", "--config", str(path), "--model", str(tiny_dir), "--adapter", str(folder / "final"),
                         "--data", str(transfer), "--json", str(tmp_path / "t.json")]) == 0
        transfer_accuracy = json.loads((tmp_path / "t.json").read_text())["accuracy"]
        assert float(rows[i]["transfer_accuracy"]) == pytest.approx(transfer_accuracy, abs=5e-5)
    assert int(rows[0]["trainable_params"]) == 0 and int(rows[2]["trainable_params"]) > 0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert "| broken |" in (tmp_path / "cmp" / "compare.md").read_text()


@pytest.mark.parametrize("row, words", [
    ({"name": "lora", "rr": 4}, "compare row 'lora rr=4': key 'method.rr'"),
    ({"name": "lora", "shots": 4}, "compare row 'lora shots=4': shots is a key of the in-context rows"),
    ({"name": "zero-shot", "shots": 4}, "compare row 'zero-shot shots=4': an in-context row takes no key 'shots'"),
    ({"name": "few-shot", "mode": "chatty"}, "compare row 'few-shot mode=chatty': key 'mode': 'chatty' is not allowed"),
    ({"name": "ia3", "train": {"learnign_rate": 1.0}}, "key 'train.learnign_rate'"),
], ids=["method-key", "icl-key-on-trained-row", "shots-on-zero-shot", "icl-value", "train-key"])
def test_a_bad_row_is_refused_before_any_row_runs(tmp_path, capsys, row, words):
    cfg = {"model": "/no/such/model",  # never loaded: the rows fail first
           "compare": {"output_dir": str(tmp_path / "cmp"), "methods": [{"name": "zero-shot"}, row]}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for command in ("compare", "config"):
        assert cli.main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cmp").exists()


def test_config_shows_a_comparisons_rows_as_they_will_run(tmp_path, capsys):
    cfg = {"method": {"name": "lora", "r": 64},  # compare reads each row's method, never this one
           "compare": {"methods": [{"name": "few-shot"}, {"name": "lora", "r": 2, "train": {"learning_rate": 1e-3}}]}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["config", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert "method" not in shown and "output_dir" not in shown["train"]
    few, lora = shown["compare"]["methods"]
    assert few == {"name": "few-shot", "label": "few-shot", "shots": 4, "mode": "chat", "strategy": "random",
                   "calibrate": False}
    assert lora["label"] == "lora r=2" and lora["r"] == 2 and lora["lora_alpha"] == 16.0
    assert lora["train"] == {"learning_rate": 1e-3}
