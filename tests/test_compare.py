"""`tuneforge compare` on the tiny model: every row reported, a failing one included."""

import csv

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
    assert cli.main(["compare", str(path)]) == 0
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [r["label"] for r in rows] == ["zero-shot", "broken", "lora r=2 target_modules=all-linear", "features layer=1"]
    broken = rows[1]
    assert "no_such_layer" in broken["error"] and broken["accuracy"] == ""
    for r in (rows[0], rows[2], rows[3]):
        assert r["error"] == "" and 0 <= float(r["accuracy"]) <= 1 and r["transfer_accuracy"] != ""
        assert float(r["peak_memory_mb"]) > 0
    assert int(rows[0]["trainable_params"]) == 0 and int(rows[2]["trainable_params"]) > 0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert "| broken |" in (tmp_path / "cmp" / "compare.md").read_text()
