"""The output folder, resume and checkpoints under hostile input (docs/reliability.md, one test per
row): a folder tuneforge did not write, changed data, an edited config.yaml, damaged checkpoints,
output folders that cannot or must not be used, a start that failed, and paths checked before any
model is read."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_reliability import config, one_line
from test_run import sentiment_rows, write_jsonl
from tuneforge import cli
from tuneforge.core import config as config_mod
from tuneforge.core.errors import UserError
from tuneforge.training import checkpoint
from tuneforge.training import run as run_mod


def test_hidden_files_of_a_folder_tuneforge_did_not_write_are_left_alone(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".notes.tmp").write_text("mine")
    (out / ".photos.old").mkdir()  # named as tuneforge's temporaries are, but the user's
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    assert cli.main(["train", str(cfg)]) == 2
    assert "files tuneforge did not write (.notes.tmp, .photos.old)" in one_line(capsys.readouterr().err)
    assert (out / ".notes.tmp").read_text() == "mine" and (out / ".photos.old").is_dir()
    assert not (out / "photos").exists()
    for name in (".notes.tmp", ".photos.old"):  # in a run's own folder: only the run's temporaries go
        os.replace(out / name, tmp_path / name)
    assert cli.main(["train", str(cfg)]) == 0
    os.replace(tmp_path / ".notes.tmp", out / ".notes.tmp")
    (out / ".summary.json.ab12.tmp").write_text("{")
    assert cli.main(["train", str(cfg), "--resume"]) == 0
    assert (out / ".notes.tmp").read_text() == "mine" and not (out / ".summary.json.ab12.tmp").exists()


def test_resume_refuses_data_whose_bytes_changed(tmp_path, tiny_dir, capsys):
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    assert cli.main(["train", str(cfg)]) == 0
    rows = sentiment_rows(24)
    flipped = [{**r, "label": "negative" if r["label"] == "positive" else "positive"} for r in rows]
    for changed in (flipped, rows[::-1]):  # labels flipped, rows shuffled: the path is the same
        write_jsonl(tmp_path / "d.jsonl", changed)
        assert cli.main(["train", str(cfg), "--resume", "--set", "train.max_steps=4"]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"{tmp_path / 'd.jsonl'}: the data changed since the run started" in line
    write_jsonl(tmp_path / "d.jsonl", rows)
    assert cli.main(["train", str(cfg), "--resume", "--set", "train.max_steps=4"]) == 0


def test_resume_checks_an_edited_config_yaml_against_the_checkpoint(tmp_path, tiny_dir, capsys):
    """The UI's Resume launches OUTPUT_DIR/config.yaml: an edit there is compared with what the
    checkpoint was made under, not with itself."""
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    assert cli.main(["train", str(cfg)]) == 0
    recorded = tmp_path / "out" / "config.yaml"
    raw = yaml.safe_load(recorded.read_text())
    raw["train"] = {**raw["train"], "learning_rate": 5e-3, "seed": 7}
    recorded.write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(recorded), "--resume", "--set", "train.max_steps=4"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "step-0000002/state.json" in line and "train.learning_rate (0.01 -> 0.005)" in line
    assert "train.seed (0 -> 7)" in line


def test_a_damaged_checkpoint_is_refused_naming_the_one_before(tmp_path, tiny_dir, capsys):
    """Tensor bytes changed after saving (the file still parses), or a state.json that lost a part."""
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 4, "save_steps": 2, "eval_steps": 0})
    assert cli.main(["train", str(cfg)]) == 0
    earlier, latest = checkpoint.complete(tmp_path / "out" / "checkpoints")
    resume = ["train", str(cfg), "--resume", "--set", "train.max_steps=6"]
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        path = latest / name
        good = path.read_bytes()
        damaged = bytearray(good)
        damaged[-5] ^= 0xFF
        path.write_bytes(bytes(damaged))
        assert cli.main(resume) == 2
        line = one_line(capsys.readouterr().err)
        assert f"({name}: the hash differs), so the file is damaged" in line and f"resume from {earlier.name}" in line
        path.write_bytes(good)
    state = json.loads((latest / checkpoint.STATE).read_text())
    (latest / checkpoint.STATE).write_text(json.dumps({k: v for k, v in state.items() if k != "optimizer"}))
    assert cli.main(resume) == 2
    line = one_line(capsys.readouterr().err)
    assert "state.json: the checkpoint's state.json lacks optimizer" in line and earlier.name in line


def test_an_output_dir_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path, tiny_dir, capsys, monkeypatch):
    (tmp_path / "out").write_text("not a folder")
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    assert cli.main(["train", str(cfg)]) == 2
    assert "is a file, not a folder" in one_line(capsys.readouterr().err)
    assert (tmp_path / "out").read_text() == "not a folder"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes past the mode bits: the file system's refusal is simulated
        real = os.mkdir

        def refuse(path, *args, **kwargs):
            if Path(path).absolute().is_relative_to(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", refuse)
    try:
        cfg = config(tmp_path, tiny_dir, train={"max_steps": 2, "output_dir": str(locked / "runs" / "out")})
        assert cli.main(["train", str(cfg)]) == 2
        assert "you can write to" in one_line(capsys.readouterr().err)
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("output_dir", ["", "."])
def test_an_output_dir_that_is_the_current_folder_is_refused_even_with_overwrite(tmp_path, tiny_dir, capsys,
                                                                                 monkeypatch, output_dir):
    here = tmp_path / "here"
    here.mkdir()
    (here / "keep.txt").write_text("mine")
    monkeypatch.chdir(here)
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2, "output_dir": output_dir})
    assert cli.main(["train", str(cfg), "--overwrite"]) == 2
    assert "is the current folder, or one that holds it" in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in here.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob("*previous-*"))


def test_a_start_that_failed_before_its_first_checkpoint_does_not_block_the_rerun(tmp_path, tiny_dir, capsys,
                                                                                  monkeypatch):
    def fails(*args, **kwargs):
        raise UserError("cannot load the model (as a broken download would)")

    monkeypatch.setattr(run_mod, "load_model", fails)
    made = config(tmp_path, tiny_dir, "made.yaml", train={"max_steps": 2, "output_dir": str(tmp_path / "runs" / "a")})
    assert cli.main(["train", str(made)]) == 2
    assert not (tmp_path / "runs").exists()  # the folders it made went with it
    out = tmp_path / "out"
    out.mkdir()  # a folder that was there before: the start's files stay, and the rerun takes their place
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    assert cli.main(["train", str(cfg)]) == 2
    assert (out / "config.yaml").is_file()
    capsys.readouterr()
    assert cli.main(["train", str(cfg), "--resume"]) == 2
    assert "there is no checkpoint to resume from" in one_line(capsys.readouterr().err)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')  # as a start that trained, then failed
    monkeypatch.undo()
    assert cli.main(["train", str(cfg)]) == 0
    aside = next(tmp_path.glob("out.previous-*"))
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.7}\n'
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_a_home_output_dir_is_the_home_folder(tmp_path, tiny_dir, capsys, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2, "output_dir": "~/x"})
    assert cli.main(["train", str(cfg)]) == 0
    assert (home / "x" / "final" / "adapter_model.safetensors").is_file() and not (work / "~").exists()
    assert f"train.output_dir ~/x is {home / 'x'}" in capsys.readouterr().err


@pytest.mark.parametrize("sections,words", [
    ({"data": {"path": None}}, "data.path: no training data file"),
    ({"data": {"path": "missing.jsonl"}}, "missing.jsonl: no such data file"),
    ({"data": {"eval_path": "held-out.jsonl"}}, "held-out.jsonl: no such data file"),
    ({"train": {"start_from": "no-adapter"}}, "no-adapter: no such folder"),
])
def test_every_path_a_run_needs_is_checked_before_any_model_is_read(tmp_path, tiny_dir, capsys, monkeypatch,
                                                                    sections, words):
    """A named model would be converted (hundreds of MB) before the run read its data: no model code
    may run before the paths are checked, and nothing is created."""
    def read(*args, **kwargs):
        raise AssertionError("a model was read before the paths were checked")

    for name in ("resolve_spec", "load_model", "load_tokenizer"):
        monkeypatch.setattr(run_mod, name, read)
    monkeypatch.chdir(tmp_path)
    train = {**sections.get("train", {}), "output_dir": str(tmp_path / "runs" / "x")}
    cfg = config(tmp_path, tiny_dir, model="smollm2-135m", data=sections.get("data", {}), train=train)
    assert cli.main(["train", str(cfg)]) == 2
    assert words in one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_the_example_config_trains_on_shipped_data(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config_mod.from_yaml(REPO / "configs" / "example.yaml")
    run_mod.check_inputs(cfg)  # every path it reads ships in the repository
    assert Path(cfg.data.path).parts[0] == "data" and cfg.train.max_steps <= 20  # a short run
