"""The fault matrix of docs/reliability.md, one test per row, on the tiny model: what a user (or a
crash, a signal, a full disk, a hostile file) does, what tuneforge says, and what it keeps."""

from __future__ import annotations

import ast
import faulthandler
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import warnings
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tqdm.auto import tqdm

from conftest import REPO, make_tiny_model
from test_run import sentiment_rows, write_jsonl
from tuneforge import cli
from tuneforge.core.errors import TuneforgeWarning, UserError
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import lora
from tuneforge.training import checkpoint
from tuneforge.training.optim import make_optimizer



def config(tmp_path: Path, tiny_dir: Path, name: str = "run.yaml", **sections) -> Path:
    """A LoRA run on the tiny model and a small sentiment file, with ``sections`` merged in."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(24))
    raw = {"model": str(tiny_dir), "method": {"name": "lora", "r": 4, "lora_dropout": 0.1},
           "data": {"path": str(data), "format": "classification", "val_fraction": 0.25},
           "train": {"output_dir": str(tmp_path / "out"), "max_steps": 6, "batch_size": 4, "grad_accum": 2,
                     "learning_rate": 1e-2, "save_steps": 2, "eval_steps": 3, "keep_checkpoints": 2,
                     "device": "cpu"}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


class Forked:
    """``tuneforge ARGS`` in a forked child of the test process: a process of its own (a signal or
    SIGKILL ends it alone) that has every module imported already, so it starts at once. Its stderr
    comes back through a pipe; ``limit_bytes`` sets a file-size limit in the child. A child that hangs
    is ended by ``abort``, which first has it write every thread's Python stack to that stderr."""

    def __init__(self, args: tuple[str, ...], limit_bytes: int | None = None):
        read, write = os.pipe()
        self.returncode, self._err = None, []
        self.pid = os.fork()
        if self.pid == 0:  # the child: run the command, then leave without the parent's cleanup
            code = 1
            try:
                os.close(read)
                os.dup2(write, 2)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                sys.stderr, sys.stdout = os.fdopen(2, "w", buffering=1), open(os.devnull, "w")
                faulthandler.enable(sys.stderr, all_threads=True)  # SIGABRT (``abort``): the stacks, then the end
                # tqdm's default lock is a semaphore every fork shares: a child killed while it draws its bar (as
                # the signal tests kill them) would leave it taken, and every later child would wait on it forever
                tqdm.set_lock(threading.RLock())
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # and no core file of the whole test process
                if limit_bytes:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
                code = cli.main(list(args))
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write)
        self._reader = threading.Thread(target=self._read, args=(read,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            for chunk in iter(lambda: pipe.read1(65536), b""):
                self._err.append(chunk)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def stderr(self) -> str:
        self._reader.join(timeout=30)
        return b"".join(self._err).decode(errors="replace")

    def abort(self, what: str) -> AssertionError:
        """End a child that hangs, its threads' stacks first, and the failure to raise: ``what`` and its stderr."""
        self.send_signal(signal.SIGABRT)
        deadline = time.time() + 10
        while self.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        self.send_signal(signal.SIGKILL)
        while self.poll() is None:
            time.sleep(0.01)
        err = self.stderr()
        dump = err.rfind("Fatal Python error")  # the stacks, whole, and what the run wrote before them, in part
        return AssertionError(f"{what}; its stderr, with every thread's stack:\n"
                              f"{err[max(0, dump - 2000) if dump >= 0 else -6000:]}")


def tuneforge(*args: str, limit_bytes: int | None = None) -> Forked:
    return Forked(args, limit_bytes)


def finish(proc: Forked, timeout: float = 120) -> tuple[int, str]:
    deadline = time.time() + timeout
    while proc.poll() is None:
        if time.time() > deadline:
            raise proc.abort(f"the run did not end within {timeout} s")
        time.sleep(0.005)
    return proc.returncode, proc.stderr()


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("tuneforge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def adapter_tensors(out: Path) -> dict:
    return load_file(out / "final" / "adapter_model.safetensors")


# -- loading: nothing runs code ------------------------------------------------------------------

class Planted:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_a_pickled_checkpoint_is_refused_and_runs_nothing(tmp_path, tiny_dir):
    cfg = config(tmp_path, tiny_dir)
    assert cli.main(["train", str(cfg), "--set", "train.max_steps=2"]) == 0
    step = checkpoint.complete(tmp_path / "out" / "checkpoints")[-1]
    marker = tmp_path / "ran.txt"
    (step / "optimizer.pt").write_bytes(pickle.dumps(Planted(str(marker))))
    (step / "state.json").unlink()  # as a checkpoint of tuneforge 0.1.0 looked
    code, err = finish(tuneforge("train", str(cfg), "--resume", "--set", "train.max_steps=4"))
    assert code == 2 and "older tuneforge, as a pickle" in one_line(err) and not marker.exists()


def test_the_package_never_unpickles():
    source = "\n".join(p.read_text() for p in (REPO / "tuneforge").rglob("*.py"))
    assert not re.search(r"^\s*(import pickle|from pickle)|pickle\.loads?\(", source, re.M)
    assert all("weights_only=True" in call for call in re.findall(r"torch\.load\([^)]*\)", source))
    assert "trust_remote_code=True" not in source


def test_a_model_folder_of_pickled_weights_needs_allow_pickle(tmp_path, tiny_dir, capsys):
    folder = tmp_path / "pickled"
    model = make_tiny_model(259)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a folder as older tools wrote them
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (folder / f.name).write_bytes(f.read_bytes())
    assert not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin"))
    args = ["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1"]
    assert cli.main(args) == 2
    assert "only as a pickle" in one_line(capsys.readouterr().err)
    assert cli.main([*args, "--allow-pickle"]) == 0  # read with torch's weights-only loader


def test_truncated_model_weights_are_one_line(tmp_path, tiny_dir, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    assert cli.main(["generate", "--model", str(folder), "--prompt", "hi"]) == 2
    assert "cannot load the model" in one_line(capsys.readouterr().err)


def test_a_pickled_adapter_is_refused(tmp_path, tiny, capsys):
    model, _ = tiny
    handle = lora.inject(model, lora.Config())
    save_adapter(model, handle, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(UserError, match="legacy adapter_model.bin"):
        load_adapter(make_tiny_model(259), tmp_path / "a")


# -- non-finite training ---------------------------------------------------------------------------

def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dir):
    cfg = config(tmp_path, tiny_dir, train={"learning_rate": 1e37, "max_steps": 8, "save_steps": 1,
                                            "keep_checkpoints": 1, "eval_steps": 0})
    code, err = finish(tuneforge("train", str(cfg)))
    line = one_line(err)
    assert code == 3 and re.search(r"is (nan|inf) at step \d+ \(rows .*d\.jsonl:\d+", line) and "learning_rate" in line
    out = tmp_path / "out"
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    kept = checkpoint.complete(out / "checkpoints")
    assert kept and all(torch.isfinite(t).all() for c in kept for t in load_file(c / "trainable.safetensors").values())


def test_nonfinite_steps_can_be_skipped_a_set_number_of_times(tmp_path, tiny_dir, monkeypatch):
    """A poisoned row (its loss forced to NaN) is skipped and logged; the run finishes."""
    from tuneforge.eval import lm

    real = lm.label_logprobs
    poisoned = {"calls": 0}

    def poison(model, input_ids, attention_mask, labels, *rest):
        logprobs, rows = real(model, input_ids, attention_mask, labels, *rest)
        poisoned["calls"] += 1
        return (logprobs * float("nan"), rows) if poisoned["calls"] == 3 and model.training else (logprobs, rows)

    monkeypatch.setattr(lm, "label_logprobs", poison)
    cfg = config(tmp_path, tiny_dir, train={"skip_nonfinite_steps": 1, "eval_steps": 0})
    assert cli.main(["train", str(cfg)]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped" in r]
    assert len(skipped) == 1 and skipped[0]["skipped"] == "loss" and skipped[0]["rows"][0].startswith(str(tmp_path))
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["skipped_steps"] == 1


# -- the output folder ---------------------------------------------------------------------------

def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, tiny_dir):
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 400, "save_steps": 0, "eval_steps": 0})
    first = tuneforge("train", str(cfg))
    try:
        deadline = time.time() + 60
        while not (tmp_path / "out" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.05)
        code, err = finish(tuneforge("train", str(cfg), "--overwrite"))
        assert code == 2 and f"another run (pid {first.pid})" in one_line(err)
    finally:
        first.send_signal(signal.SIGINT)
        finish(first)


def test_a_folder_with_an_earlier_run_is_refused_even_without_checkpoints(tmp_path, tiny_dir, capsys):
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    assert cli.main(["train", str(cfg)]) == 0
    before = adapter_tensors(tmp_path / "out")
    for c in checkpoint.complete(tmp_path / "out" / "checkpoints"):
        for f in c.iterdir():
            f.unlink()
        c.rmdir()
    assert cli.main(["train", str(cfg)]) == 2
    assert "already holds an earlier run (checkpoints, config.yaml, final" in one_line(capsys.readouterr().err)
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(tmp_path / "out").items())  # untouched


def test_foreign_files_are_refused_and_overwrite_moves_them_aside(tmp_path, tiny_dir, capsys):
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    (tmp_path / "out" / "final").mkdir(parents=True)
    (tmp_path / "out" / "final" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "data.csv").write_text("a,b\n")
    assert cli.main(["train", str(cfg)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "already holds an earlier run (final)" in line and "--resume" in line
    (tmp_path / "out" / "final").rename(tmp_path / "mine")
    assert cli.main(["train", str(cfg)]) == 2
    line = one_line(capsys.readouterr().err)  # no run to resume: --resume is not offered
    assert "files tuneforge did not write (data.csv)" in line and "--resume" not in line
    assert cli.main(["train", str(cfg), "--overwrite"]) == 0
    aside = next(tmp_path.glob("out.previous-*"))
    assert (aside / "data.csv").read_text() == "a,b\n" and not (tmp_path / "out" / "data.csv").exists()
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()


def test_outputs_follow_the_umask(tmp_path, tiny_dir):
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    code, err = finish(tuneforge("train", str(cfg)))  # the test process's umask, 022: group and others may read
    assert code == 0, err
    folders = [tmp_path / "out" / "final", *checkpoint.complete(tmp_path / "out" / "checkpoints")]
    inside = [p for folder in folders for p in folder.rglob("*")]  # safetensors writes its files owner-only
    assert any(p.suffix == ".safetensors" for p in inside)
    for path in [*folders, *inside, tmp_path / "out" / "summary.json", tmp_path / "out" / "config.yaml"]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_leftover_temporaries_are_put_right_on_the_next_start(tmp_path, tiny_dir):
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    assert cli.main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    (out / ".final.ab12.tmp").mkdir()  # a killed write of final/
    (out / "checkpoints" / ".step-0000004.cd34.tmp").mkdir()
    (out / ".summary.json.ef56.tmp").write_text("{")
    (out / "final").rename(out / ".final.old")  # killed between the two renames that replace final/
    assert cli.main(["train", str(cfg), "--resume"]) == 0
    names = [p.name for p in out.rglob("*")]
    assert not [n for n in names if n.endswith((".tmp", ".old"))] and (out / "final").is_dir()


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, tiny_dir, capsys):
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2, "logging_steps": 1})
    assert cli.main(["train", str(cfg)]) == 0
    metrics = tmp_path / "out" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 0.')  # a crash mid-line
    assert cli.main(["train", str(cfg), "--resume", "--set", "train.max_steps=4"]) == 0
    assert "dropped 1 torn or malformed line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4


# -- resuming --------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["train.learning_rate=5e-3", "train.batch_size=2", "method.r=8",
                                    "data.max_examples=10", "train.seed=1"])
def test_resume_refuses_a_setting_that_changes_the_result(tmp_path, tiny_dir, capsys, change):
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    assert cli.main(["train", str(cfg)]) == 0
    recorded = (tmp_path / "out" / "config.yaml").read_text()
    assert cli.main(["train", str(cfg), "--resume", "--set", change]) == 2
    assert change.split("=")[0] in one_line(capsys.readouterr().err)
    assert (tmp_path / "out" / "config.yaml").read_text() == recorded  # still describes the run


def test_resume_takes_new_logging_evaluation_and_step_budget(tmp_path, tiny_dir):
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    assert cli.main(["train", str(cfg)]) == 0
    assert cli.main(["train", str(cfg), "--resume", "--set", "train.max_steps=4", "--set", "train.logging_steps=1",
                     "--set", "train.eval_steps=1", "--set", "eval.batch_size=2", "--set", "eval.batch_tokens=64"]) == 0
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["train"]["max_steps"] == 4


def test_a_finished_run_extended_by_resume_takes_its_next_step_at_the_new_schedules_rate(tmp_path, tiny_dir):
    """A 2-step run's cosine schedule ends at rate 0, the rate its optimizer saves. Extended to 3 steps, the third
    step runs at the 3-step schedule's rate: the adapter moves, and the rate is the new schedule's."""
    from tuneforge.training.loop import follow_schedule
    from tuneforge.training.optim import lr_multiplier

    cfg = config(tmp_path, tiny_dir, train={"max_steps": 2})
    assert cli.main(["train", str(cfg)]) == 0
    before = adapter_tensors(tmp_path / "out")
    assert cli.main(["train", str(cfg), "--resume", "--set", "train.max_steps=3"]) == 0
    after = adapter_tensors(tmp_path / "out")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([p], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, 3, 0, "cosine"))
    scheduler.last_epoch, optimizer.param_groups[0]["lr"] = 2, 0.0  # as a 2-step run's checkpoint restores them
    follow_schedule(scheduler)
    assert optimizer.param_groups[0]["lr"] == 0.1 * lr_multiplier(2, 3, 0, "cosine") > 0


# -- bad input, before anything loads -----------------------------------------------------------

@pytest.mark.parametrize("setting,words", [
    ("train.learning_rate=0", "learning_rate must be above 0"), ("train.learning_rate=-1e-4", "above 0"),
    ("train.grad_accum=0", "grad_accum must be at least 1"), ("train.batch_size=0", "batch_size must be at least 1"),
    ("train.max_steps=0", "max_steps must be at least 1"), ("eval.batch_size=0", "batch_size must be at least 1"),
    ("train.epochs=0", "epochs must be above 0"), ("data.val_fraction=1.5", "val_fraction must be in [0, 1)"),
    ("method.r=0", "r must be at least 1"), ("method.lora_alpha=0", "lora_alpha must be above 0"), ("train.keep_checkpoints=0", "keep_checkpoints must be at least 1"),
    ("eval.batch_tokens=0", "batch_tokens must be at least 1"),
    ("train.device=tpu", "unknown device 'tpu'"), ("data.score_thresholds=[1]", "must be [low, high]"),
    ("data.path=[{path: a.txt, weight: 0}]", "--set data.path: key 'data.path.weight': weight must be above 0"),
])
def test_settings_that_make_no_sense_are_one_line_at_parse_time(tmp_path, tiny_dir, capsys, setting, words):
    cfg = config(tmp_path, tiny_dir, model="/no/such/model")  # never reached: the config fails first
    for command in ("train", "config"):  # `tuneforge config` checks a config as a run would
        assert cli.main([command, str(cfg), "--set", setting]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"--set {setting.split('=')[0]}" in line and words in line
    assert not (tmp_path / "out").exists()


def test_a_rank_above_a_layers_width_warns(tiny, monkeypatch):
    model, _ = tiny
    with pytest.warns(UserWarning, match=r"r=40 is above the width of .*k_proj, has 32.*at most 32"):
        lora.inject(model, lora.Config(r=40, target_modules=["q_proj", "k_proj"]))
    # on the command line, one line of its own (no file, line number or source line of Python's form); the
    # form is set for the command and put back after it
    shown, before = [], warnings.formatwarning
    monkeypatch.setattr(cli, "_config", lambda args: shown.append(
        [warnings.formatwarning(category("r=40 is above"), category, "lora.py", 1) for category in (
            TuneforgeWarning, UserWarning)]))
    assert cli.main(["config", "run.yaml"]) == 0 and warnings.formatwarning is before
    assert shown[0][0] == "tuneforge: warning: r=40 is above\n"
    assert shown[0][1] == before("r=40 is above", UserWarning, "lora.py", 1)  # any other warning as Python's


def test_a_stray_label_is_refused_where_it_is(tmp_path, tiny_dir, capsys):
    rows = sentiment_rows(24)
    rows[7]["label"] = "postive"
    cfg = config(tmp_path, tiny_dir)
    write_jsonl(tmp_path / "d.jsonl", rows)
    assert cli.main(["train", str(cfg)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "d.jsonl:8" in line and "label 'postive' appears in only 1 of 48 rows" in line and "verbalizer" in line


# -- adapters that do not fit --------------------------------------------------------------------

def trained_adapter(tmp_path):
    """A LoRA adapter with random B on the tiny model, saved to tmp_path/a: (the model, the handle)."""
    model = make_tiny_model(259)
    handle = lora.inject(model, lora.Config(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for layer in lora.layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    save_adapter(model, handle, tmp_path / "a")
    return model, handle


def test_an_adapter_on_a_changed_or_merged_base_is_refused(tmp_path, tiny):
    model, handle = trained_adapter(tmp_path)
    changed = make_tiny_model(259)
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight.mul_(1.01)  # one weight matrix, neither embedding nor norm
    with pytest.raises(UserError, match="made for .* but the model is .*differ in sha256"):
        load_adapter(changed, tmp_path / "a")
    handle.merge(model)  # the model the adapter is already in
    with pytest.raises(UserError, match="not one it was merged into"):
        load_adapter(model, tmp_path / "a")
    load_adapter(make_tiny_model(259), tmp_path / "a")  # its own base loads


def test_damaged_adapter_tensors_are_refused(tmp_path):
    trained_adapter(tmp_path)
    path = tmp_path / "a" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the last tensor: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="hash differs.*damaged"):
        load_adapter(make_tiny_model(259), tmp_path / "a")


# -- interruptions: signals, kills, a full disk ------------------------------------------------------

def run_to_the_end(cfg: Path, out: Path) -> None:
    """Resume (or, if no checkpoint was written yet, start afresh) until the run has finished."""
    for _ in range(3):
        if (out / "summary.json").exists():
            return
        resume = bool(checkpoint.complete(out / "checkpoints"))
        code, err = finish(tuneforge("train", str(cfg), "--resume" if resume else "--overwrite"))
        assert code == 0, err
    assert (out / "summary.json").exists()


def preference_pairs(n: int = 24) -> list[dict]:
    return [{"prompt": f"Question {i}: is the film good?", "chosen": f" {'Yes' if i % 2 else 'No'}, it is {i}.",
             "rejected": f" Maybe {i} or not at all."} for i in range(n)]


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_fuzz_every_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path, tiny_dir, objective):
    """SIGKILL, SIGINT and SIGTERM at random moments of a run with dropout, gradient accumulation,
    evaluations and checkpoints, supervised or DPO (its reference the model with LoRA off): each
    resumed run ends with exactly the weights of the run that was never interrupted, and no temporary
    file survives."""
    import random

    train = {"max_steps": 16, "logging_steps": 1}  # metrics.jsonl appears after the first step
    if objective != "sft":
        pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs())
        train["objective"] = objective
    sections = {} if objective == "sft" else {"data": {"path": str(pairs), "format": "preference"}}

    def until(path: Path, proc: Forked, timeout: float = 120) -> float:
        deadline = time.time() + timeout
        while not path.exists() and proc.poll() is None:
            if time.time() > deadline:
                raise proc.abort(f"the run wrote no {path.name} within {timeout} s")
            time.sleep(0.002)
        return time.perf_counter()

    reference = config(tmp_path, tiny_dir, "ref.yaml", train={**train, "output_dir": str(tmp_path / "ref")},
                       **sections)
    proc = tuneforge("train", str(reference))
    first_step = until(tmp_path / "ref" / "metrics.jsonl", proc)
    window = until(tmp_path / "ref" / "summary.json", proc) - first_step  # training, evaluations, checkpoints
    assert finish(proc)[0] == 0 and window > 0
    expected = adapter_tensors(tmp_path / "ref")
    rng = random.Random(0)
    outcomes = []
    for trial in range(9 if objective == "sft" else 6):
        out = tmp_path / f"run{trial}"
        cfg = config(tmp_path, tiny_dir, f"run{trial}.yaml", train={**train, "output_dir": str(out)}, **sections)
        sig = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)[trial % 3]
        proc = tuneforge("train", str(cfg))
        until(out / "metrics.jsonl", proc)
        time.sleep(rng.uniform(0, window))
        proc.send_signal(sig)
        code, err = finish(proc)
        outcomes.append((signal.Signals(sig).name, code))
        finished = (out / "summary.json").exists()  # a signal after the work, as the interpreter shuts down
        assert code in (0, -signal.SIGKILL, 128 + signal.SIGINT, 128 + signal.SIGTERM) or finished, err
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # in training: a checkpoint; before or after: none
            assert "tuneforge: interrupted" in err and "Traceback" not in err, err
            outcomes[-1] += ("checkpoint saved" in err,)
        run_to_the_end(cfg, out)
        got = adapter_tensors(out)
        assert got.keys() == expected.keys(), outcomes
        assert max((got[k] - expected[k]).abs().max().item() for k in got) == 0, outcomes
        assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert any(len(o) == 3 and o[2] for o in outcomes), outcomes  # a signal did land mid-training
    assert any(o[1] == -signal.SIGKILL for o in outcomes), outcomes


@pytest.mark.parametrize("limit", ["tmpfs", "file-size limit"])
def test_a_full_disk_stops_the_run_with_one_line_and_every_earlier_checkpoint_loads(tmp_path, tiny_dir, limit):
    """A small file system fills up mid-run (a 300 kB tmpfs: the checkpoints fill it), or a file grows
    past the process's file-size limit (metrics.jsonl, one line a step, outgrows 20 kB first)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = limit == "tmpfs" and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)],
                                                  capture_output=True).returncode == 0
    if limit == "tmpfs" and not mounted:
        pytest.skip("this machine does not let the tests mount a tmpfs; the file-size limit case still runs")
    try:
        train = {"output_dir": str(disk / "out"), "max_steps": 200, "save_steps": 1, "keep_checkpoints": 1000,
                 "eval_steps": 0, "logging_steps": 1}
        cfg = config(tmp_path, tiny_dir, train=train)
        code, err = finish(tuneforge("train", str(cfg), limit_bytes=None if mounted else 20_000), timeout=300)
        line = one_line(err)
        assert code == 3 and ("no space left" in line or "size limit" in line), err
        kept = checkpoint.complete(disk / "out" / "checkpoints")
        assert kept
        for c in kept:  # every checkpoint left loads into a fresh run's tensors
            model = make_tiny_model(259)
            params = lora.inject(model, lora.Config(r=4, lora_dropout=0.1)).trainable(model)
            optimizer = make_optimizer(params, 1e-2, 0.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            saved = checkpoint.read(c, params, {k: p.shape for k, p in params.items()})
            assert checkpoint.restore(saved, params, optimizer, scheduler)["step"] == int(c.name.split("-")[1])
        lines = (disk / "out" / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(line) for line in lines)  # no half-written line
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=True)  # lazily: loaded tensors may map its files


def test_the_reliability_table_lists_exactly_these_tests():
    """docs/reliability.md's last column against the tests of this file and of its siblings by area
    (``tests/test_reliability_*.py``)."""
    table = (REPO / "docs" / "reliability.md").read_text()
    listed = re.findall(r"\| `(test_\w+)` \|", table)
    here = []
    for path in sorted((REPO / "tests").glob("test_reliability*.py")):
        tree = ast.parse(path.read_text())
        here += [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    here.remove("test_the_reliability_table_lists_exactly_these_tests")
    assert sorted(listed) == sorted(here) and len(listed) == len(set(listed))
