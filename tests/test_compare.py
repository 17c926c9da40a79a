"""`tuneforge compare` on the tiny model: every row reported, a failing one included; every row checked
before the first runs, a bad one named where it was written; Ctrl-C stops a comparison in one line."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tuneforge import cli
from tuneforge.apps import compare
from tuneforge.core import config
from tuneforge.core.config.methods import METHODS
from tuneforge.core.errors import UserError
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
    ({"name": "lora", "shots": 4}, "compare row 'lora shots=4': key 'shots': shots is a key of the in-context rows"),
    ({"name": "zero-shot", "shots": 4},
     "compare row 'zero-shot shots=4': key 'shots': an in-context row takes no key 'shots'"),
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
        assert f"{path}:" in err  # the file and the line of the row's key
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


CHOICES = ", ".join([*METHODS, "zero-shot", "few-shot"])  # the in-context rows are methods of a comparison too


@pytest.mark.parametrize("row, line, words", [
    ("- name: lora\n      rr: 4", 7, "compare row 'lora rr=4': key 'method.rr': unknown key 'method.rr'"),
    ("- {name: ia4}", 6, f"compare row 'ia4': key 'name': unknown method 'ia4'; did you mean 'ia3'? use one of "
                         f"{CHOICES}"),
    ("- name: ia3\n      train:\n        learnign_rate: 1.0", 8,
     "compare row 'ia3': key 'train.learnign_rate': unknown key 'train.learnign_rate'"),
    ("- {name: zero-shot, shots: 4}", 6, "compare row 'zero-shot shots=4': key 'shots': an in-context row takes no"),
    ("- {r: 4}", 6, "key 'compare.methods': a row without a method name: {'r': 4}"),
], ids=["method-key", "method-name", "train-key", "icl-key", "no-name"])
def test_a_bad_rows_error_names_the_file_and_the_line_of_its_key(tmp_path, row, line, words):
    path = tmp_path / "cmp.yaml"
    path.write_text(f"model: /no/such/model\ncompare:\n  output_dir: {tmp_path / 'cmp'}\n  methods:\n"
                    f"    - name: few-shot\n    {row}\n")
    cfg = config.from_yaml(path)
    for check in (lambda: compare.rows(cfg, compare.row_places(path)),
                  lambda: compare.as_compared(cfg, compare.row_places(path)),
                  lambda: compare.compare(cfg, places=compare.row_places(path))):
        with pytest.raises(UserError) as caught:
            check()
        assert caught.value.line().startswith(f"{path}:{line}: {words}"), caught.value.line()
    assert not (tmp_path / "cmp").exists()


def test_a_bad_row_given_by_set_names_set(tmp_path):
    path = tmp_path / "cmp.yaml"
    path.write_text("model: /no/such/model\ncompare:\n  methods:\n    - name: zero-shot\n")
    given = ["compare.methods=[{name: zero-shot}, {name: lora, rr: 4}]"]
    with pytest.raises(UserError) as caught:
        compare.rows(config.from_yaml(path, given), compare.row_places(path, given))
    where = "--set compare.methods: compare row 'lora rr=4': key 'method.rr'"  # the file holds no such row
    assert caught.value.line().startswith(f"{where}: unknown key 'method.rr'"), caught.value.line()


def test_ctrl_c_stops_a_comparison_in_one_line_and_ends_its_row_process(tmp_path, tiny_dir, capsys):
    """SIGINT to the process group, as Ctrl-C sends it, while a row trains: exit code 130 and one line naming the
    rows that finished, where their table is and how to run the comparison again; the row's process ends without
    a traceback and without the training loop's checkpoint line."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(16))
    out = tmp_path / "cmp"
    cfg = {"model": str(tiny_dir),
           "data": {"path": str(data), "format": "classification", "max_length": 256, "val_fraction": 0.25},
           "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
           "compare": {"output_dir": str(out),
                       "methods": [{"name": "zero-shot"},
                                   {"name": "lora", "r": 2, "train": {"max_steps": 100000, "logging_steps": 1}},
                                   {"name": "features", "layer": 1}]}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "compare", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        metrics, deadline = out / "01-lora-r-2" / "metrics.jsonl", time.time() + 180
        while proc.poll() is None and time.time() < deadline and '"loss"' not in _text(metrics):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # the row is in its training loop
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == (
        f"tuneforge: interrupted in row 2 of 3 ('lora r=2'); {out / 'compare.md'} holds the 1 row that finished "
        "('zero-shot'); compare does not continue a comparison: to run it again, set compare.output_dir to a new "
        f"folder (--set compare.output_dir=DIR), or rename {out}"), err
    for noise in ("Traceback", "KeyboardInterrupt", "checkpoint saved", "resource_tracker", "tuneforge: interrupted\n"):
        assert noise not in err, err
    assert "| zero-shot |" in (out / "compare.md").read_text()
    deadline = time.time() + 20
    while _running_in_group(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _running_in_group(proc.pid)  # the row's process ended too
    assert cli.main(["compare", str(path)]) == 2  # the folder is kept, and the refusal gives the same two ways
    assert "set compare.output_dir to a new folder (--set compare.output_dir=DIR)" in capsys.readouterr().err


def _text(path):
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _running_in_group(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that have not exited (a zombie has)."""
    running = []
    for stat in os.scandir("/proc"):
        if stat.name.isdigit():
            try:
                fields = open(f"/proc/{stat.name}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                running.append(int(stat.name))
    return running
