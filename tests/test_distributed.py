"""torch.distributed on this machine: 2 processes under torchrun with gloo, on the tiny model, against
one process with the same global batch (2 ranks x batch 4 against 1 process x batch 4 x accumulation 2).

Each comparison is of the loss curve, of the gradient (its norm at every step: a sum where a mean
was meant doubles it) and of the final weights."""

from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from test_reliability import preference_pairs
from test_run import sentiment_rows, write_jsonl
from tuneforge import cli
from tuneforge.core import config
from tuneforge.core.errors import UserError
from tuneforge.training import checkpoint, output

METHODS = {"lora": {"name": "lora", "r": 4, "lora_dropout": 0.0}, "full": {"name": "full"}}
# Full fine-tuning at a lower rate: over tens of steps a larger one amplifies the rounding of a
# different summation order (one process against two) past the tolerance
RATES = {"lora": 1e-2, "full": 1e-3}
TOLERANCE = 1e-4


def write_config(tmp_path: Path, tiny_dir: Path, name: str, method: str, data: dict | None = None,
                 **train) -> Path:
    if data is None:
        data = {"path": str(tmp_path / "d.jsonl"), "format": "classification", "val_fraction": 0.25}
        if not (tmp_path / "d.jsonl").exists():
            write_jsonl(tmp_path / "d.jsonl", sentiment_rows(20))
    raw = {"model": str(tiny_dir), "method": METHODS[method], "data": data,
           "train": {"output_dir": str(tmp_path / name), "max_steps": 4, "batch_size": 4,
                     "learning_rate": RATES[method], "save_steps": 2, "logging_steps": 1, "device": "cpu",
                     "dist_timeout_s": 60, **train}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def two_processes(cfg: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg), "--nproc", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, timeout: float = 240) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return err


def curve(out: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]


def assert_same_curve(a: Path, b: Path) -> None:
    one, two = curve(a), curve(b)
    assert [s for s, _, _ in one] == [s for s, _, _ in two] and one
    for (step, loss_a, norm_a), (_, loss_b, norm_b) in zip(one, two):
        assert abs(loss_a - loss_b) <= TOLERANCE, (step, loss_a, loss_b)
        assert abs(norm_a - norm_b) <= TOLERANCE * max(1.0, norm_a), (step, norm_a, norm_b)


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(next((out / "final").glob("*.safetensors")))


def assert_same_weights(a: Path, b: Path) -> None:
    one, two = final_tensors(a), final_tensors(b)
    assert one.keys() == two.keys() and one
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= TOLERANCE, worst


@pytest.mark.parametrize("method, engine, checkpointing", [("lora", "DDP", False), ("full", "FSDP2", False),
                                                          ("lora", "DDP", True)])
def test_two_processes_train_what_one_does_with_the_same_global_batch(tmp_path, tiny_dir, method, engine,
                                                                      checkpointing):
    """With activation checkpointing too: non-reentrant, so DDP sees each parameter once."""
    one = write_config(tmp_path, tiny_dir, "one", method, grad_accum=2, gradient_checkpointing=checkpointing)
    two = write_config(tmp_path, tiny_dir, "two", method, grad_accum=1, gradient_checkpointing=checkpointing)
    proc = two_processes(two)
    assert cli.main(["train", str(one)]) == 0  # while the two processes start
    err = finished(proc)
    assert f"2 processes (gloo, {engine}): global batch 8 = batch_size 4 x grad_accum 1 x 2 processes" in err
    assert_same_curve(tmp_path / "one", tmp_path / "two")
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two")]
    assert summaries[0]["tokens"] == summaries[1]["tokens"]  # every rank's tokens, summed
    assert {p.name for p in (tmp_path / "two").iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoints",
                                                                 "final", "summary.json", "loss.png"}
    if method == "lora":  # the adapter written from two ranks is whole, and PEFT reads it
        ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
        logits = []
        for name in ("one", "two"):
            base = AutoModelForCausalLM.from_pretrained(tiny_dir)
            model = peft.PeftModel.from_pretrained(base, tmp_path / name / "final").eval()
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits)
        assert (logits[0] - logits[1]).abs().max().item() <= TOLERANCE


def test_dpo_under_two_processes_trains_what_one_does(tmp_path, tiny_dir):
    """Preference tuning under DDP: each pair runs as a forward of its own (its prompt once), several
    before one backward, and every rank's reference is its model with LoRA off."""
    write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(24))
    data = {"path": str(tmp_path / "pairs.jsonl"), "format": "preference", "val_fraction": 0.25}
    one = write_config(tmp_path, tiny_dir, "one", "lora", data, grad_accum=2, objective="dpo")
    two = write_config(tmp_path, tiny_dir, "two", "lora", data, grad_accum=1, objective="dpo")
    proc = two_processes(two)
    assert cli.main(["train", str(one)]) == 0
    assert "2 processes (gloo, DDP)" in finished(proc)
    assert_same_curve(tmp_path / "one", tmp_path / "two")
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    first = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) <= 1e-5  # both ranks' references: the policy at the start


def rank_pids(launcher: int) -> dict[int, int]:
    """The launcher's worker processes by rank (torchrun's agent runs in the launcher itself)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ppid == launcher and rank:
            found[int(rank[0])] = int(proc.name)
    return found


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not checkpoint.complete(out / "checkpoints"):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)


def test_a_killed_process_ends_the_run_and_its_last_checkpoint_resumes_on_one(tmp_path, tiny_dir):
    two = write_config(tmp_path, tiny_dir, "two", "lora", grad_accum=1, max_steps=40, lr_schedule="constant")
    proc = two_processes(two)
    wait_for_checkpoint(tmp_path / "two", proc)
    pids = rank_pids(proc.pid)
    assert set(pids) == {0, 1}, pids
    killed = time.time()
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=90)  # well within the run's 60 s collective timeout, or it hung
    assert proc.returncode != 0 and time.time() - killed < 60
    assert "process 1 of 2 ended with signal SIGKILL" in err, err[-2000:]
    kept = checkpoint.complete(tmp_path / "two" / "checkpoints")
    assert kept and all((c / checkpoint.STATE).is_file() for c in kept)
    # The checkpoint resumes in one process (grad_accum 2 keeps the global batch at 8) to the weights
    # of a one-process run that was never stopped
    assert cli.main(["train", str(two), "--resume", "--set", "train.grad_accum=2"]) == 0
    one = write_config(tmp_path, tiny_dir, "one", "lora", grad_accum=2, max_steps=40, lr_schedule="constant")
    assert cli.main(["train", str(one)]) == 0
    assert_same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sigterm_stops_every_process_at_one_step_and_two_processes_resume(tmp_path, tiny_dir, method):
    two = write_config(tmp_path, tiny_dir, "two", method, grad_accum=1, max_steps=40, lr_schedule="constant")
    proc = two_processes(two)
    wait_for_checkpoint(tmp_path / "two", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted; checkpoint saved at step" in err, err[-3000:]
    step = checkpoint.complete(tmp_path / "two" / "checkpoints")[-1].name
    assert step != "step-0000040"  # stopped before the end
    finished(two_processes(two, "--resume"))
    one = write_config(tmp_path, tiny_dir, "one", method, grad_accum=2, max_steps=40, lr_schedule="constant")
    assert cli.main(["train", str(one)]) == 0
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert_same_curve(tmp_path / "one", tmp_path / "two")


def test_resume_with_another_number_of_processes_keeps_the_global_batch(tmp_path, tiny_dir):
    path = write_config(tmp_path, tiny_dir, "one", "lora", grad_accum=2, max_steps=2)
    assert cli.main(["train", str(path)]) == 0
    out = tmp_path / "one"
    same = config.from_yaml(path, ["train.grad_accum=1"])
    output.check_resume(same, out, world=2)  # 4 x 1 x 2 = 4 x 2 x 1
    with pytest.raises(UserError, match="global batch of 16") as exc:
        output.check_resume(config.from_yaml(path), out, world=2)
    assert "set train.grad_accum to 1, or resume with 1 process and grad_accum 2" in exc.value.line()
    # A start that saved nothing (refused, killed) rewrote config.yaml with its own grad_accum: the
    # checkpoint's record of the global batch decides
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("grad_accum: 2", "grad_accum: 4"))
    output.check_resume(config.from_yaml(path), out, world=1)
    with pytest.raises(UserError, match="global batch of 16"):
        output.check_resume(config.from_yaml(path, ["train.grad_accum=4"]), out, world=1)


def test_an_epoch_sized_run_under_two_processes_is_estimated_at_the_steps_it_takes(tmp_path, tiny_dir):
    """The estimate and the loop count an epoch's steps one way: two processes share each step's
    micro-batches, so an epoch has half the steps of one process (the estimate once counted them all)."""
    two = write_config(tmp_path, tiny_dir, "two", "lora", max_steps=None, epochs=1, grad_accum=1, save_steps=0)
    err = finished(two_processes(two))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    steps = summary["steps"]
    assert steps == math.ceil(math.ceil(summary["train_examples"] / 4) / 2)  # batches of 4, two a step
    assert re.search(rf"min for {steps} steps \(per process, 2 processes\)", err), err[-2000:]
