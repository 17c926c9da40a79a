"""docs/reliability.md's rows for settings, messages and runs of several processes: hostile numbers and
nesting in a config, a full disk against a file-size limit, advice that names only checkpoints that
exist, and a process of a distributed run that dies or is stopped while the others wait for it."""

from __future__ import annotations

import errno
import io
import math
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from test_reliability import config, finish, one_line, tuneforge
from test_train import collate, synthetic_examples, tiny_full
from tuneforge import cli
from tuneforge.core.config import TrainCfg
from tuneforge.core.config.parse import load_yaml
from tuneforge.core.errors import RunStopped, UserError
from tuneforge.training import checkpoint, metrics
from tuneforge.training.loop import train

DEEP_LIST = "[" * 3000 + "]" * 3000


@pytest.mark.parametrize("text,words", [
    ("train:\n  learning_rate: .nan\n", "key 'train.learning_rate': learning_rate must be a finite number"),
    ("train:\n  epochs: .inf\n", "key 'train.epochs': epochs must be a finite number"),
    ("train:\n  max_grad_norm: .nan\n", "key 'train.max_grad_norm': max_grad_norm must be a finite number"),
    ("train:\n  weight_decay: -.inf\n", "key 'train.weight_decay': weight_decay must be a finite number"),
    (f"eval:\n  batch_size: {'9' * 5000}\n", "key 'eval.batch_size': a number of 5,000 digits is not a setting"),
    (f"eval:\n  batch_size: {'9' * 4000}\n", "key 'eval.batch_size': batch_size has 4000 digits"),
    (f"compare:\n  methods: {DEEP_LIST}\n", "key 'compare.methods.0.0.(...)': nested deeper than 32 levels"),
    ("eval:\n" + "".join("  " * i + "a:\n" for i in range(1, 3000)), "key 'eval.a.a.a.(...)': nested deeper"),
    ("compare:\n  methods: &x [*x]\n", "nested deeper than 32 levels once its aliases are expanded"),
    ("--set train.learning_rate=nan", "--set train.learning_rate: learning_rate must be a finite number"),
    ("--set train.max_grad_norm=inf", "--set train.max_grad_norm: max_grad_norm must be a finite number"),
    (f"--set train.seed={'1' * 5000}", "--set train.seed: a number of 5,000 digits"),
    ("--set train.seed=99999999999", "--set train.seed: seed must be at least 0 and below 2**32"),
    (f"--set compare.methods={DEEP_LIST}", "--set compare.methods: nested deeper than 32 levels"),
])
def test_nonfinite_huge_and_deeply_nested_settings_are_one_line_at_parse_time(tmp_path, tiny_dir, capsys, text,
                                                                             words):
    """NaN passes every range check and infinity breaks every count; Python reads no integer of more
    than 4300 digits from text; YAML's composer recurses. Each is one line before any model loads."""
    cfg = config(tmp_path, tiny_dir, model="/no/such/model")  # never reached: the config fails first
    args = ["train", str(cfg)]
    if text.startswith("--set"):
        args += text.split(" ", 1)
    else:
        cfg.write_text(written_into(cfg.read_text(), text))
    assert cli.main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert words in line and len(line) < 400, line
    assert not (tmp_path / "out").exists()


def written_into(yaml_text: str, text: str) -> str:
    """``text``, a top-level section and its lines, written into ``yaml_text``'s section of that name in place
    of the keys it sets there (a key written twice is refused), or after it where there is none."""
    head, body = text.split("\n", 1)
    lines = yaml_text.splitlines(keepends=True)
    if head + "\n" not in lines:
        return yaml_text + text
    start = lines.index(head + "\n") + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith(" ")), len(lines))
    keys = {line.split(":", 1)[0] for line in body.splitlines()}
    block = [line for line in lines[start:end] if line.split(":", 1)[0] not in keys]
    return "".join(lines[:start] + [body] + block + lines[end:])


def test_a_key_written_twice_is_one_line_naming_both_lines(tmp_path, tiny_dir, capsys):
    """YAML keeps the last of two equal keys without a word: a second ``data:`` section drops the first's
    path, and a second ``max_steps`` silently wins."""
    cfg = config(tmp_path, tiny_dir)
    text = cfg.read_text()
    cfg.write_text(text.replace("  max_steps: 6\n", "  max_steps: 6\n  max_steps: 2\n"))
    assert cli.main(["train", str(cfg)]) == 2
    line = one_line(capsys.readouterr().err)
    first = text.splitlines().index("  max_steps: 6") + 1
    assert (f"{cfg}:{first + 1}: key 'train.max_steps': the key 'max_steps' is written twice (first on line "
            f"{first})") in line and "keep one" in line
    cfg.write_text(text + "data:\n  max_length: 64\n")
    assert cli.main(["train", str(cfg)]) == 2
    assert "key 'data': the key 'data' is written twice" in one_line(capsys.readouterr().err)
    cfg.write_text(text)
    assert cli.main(["train", str(cfg), "--set", "train={max_steps: 2, max_steps: 3}"]) == 2
    assert "--set train: the key 'max_steps' is written twice" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    # keys of two types are two keys, and a plain << merges a mapping in (twice, two mappings)
    where = lambda key, line: f"{key}:{line}"  # noqa: E731
    assert load_yaml('a: {"1": x, 1: y, true: z, "true": w}', where)["a"] == {"1": "x", 1: "y", True: "z", "true": "w"}
    assert load_yaml("b: &b {p: 1}\nc: &c {r: 1}\na:\n  <<: *b\n  <<: *c\n", where)["a"] == {"p": 1, "r": 1}
    with pytest.raises(UserError, match="the key '<<' is written twice"):
        load_yaml('a: {"<<": 1, "<<": 2}', where)


def test_a_method_key_without_method_name_says_full_is_the_default(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\n")
    assert cli.main(["config", str(path), "--set", "method.r=4"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "no method.name is given, so the method is full, the default" in line
    assert "r is a key of lora, qlora, vera" in line and "--set method.name=lora" in line
    assert cli.main(["config", str(path), "--set", "method.r=4", "--set", "method.name=lora"]) == 0


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EFBIG, "size limit")])
def test_a_full_disk_and_a_file_size_limit_are_told_apart_in_metrics(tmp_path, monkeypatch, code, words):
    """Both stop a write short first (the bytes that fit are written); only the next write's error says
    which it is. A short write was once taken for the size limit, so a full disk said "ulimit -f"."""
    path = tmp_path / "metrics.jsonl"
    metrics.append(path, {"step": 1, "loss": 1.0})
    kept = path.read_bytes()

    class Short(io.FileIO):
        """A file on a device that takes 10 more bytes, then fails with ``code``."""

        def write(self, data) -> int:
            if self.tell() == len(kept):
                return super().write(bytes(data[:10]))
            raise OSError(code, "simulated")

    monkeypatch.setattr(metrics, "open", lambda p, mode, buffering: Short(p, mode), raising=False)
    with pytest.raises(RunStopped, match=words):
        metrics.append(path, {"step": 2, "loss": 0.5})
    assert path.read_bytes() == kept  # the part-written line is cut back


def test_a_run_whose_weights_go_nonfinite_names_a_checkpoint_only_if_one_was_written(tmp_path):
    """The advice names the latest checkpoint on disk, or says there is none; and it does not send the
    user to --resume with a new learning rate, which resuming refuses."""
    lines = []
    for save_steps in (0, 1):
        model, params = tiny_full()

        def poison(step: int) -> None:  # the weights go non-finite after step 2, its loss still finite
            if step == 2:
                with torch.no_grad():
                    next(iter(params.values())).fill_(math.nan)

        with pytest.raises(RunStopped) as stopped:
            train(model, params, synthetic_examples(8), collate, TrainCfg(batch_size=4, max_steps=6,
                  save_steps=save_steps), tmp_path / str(save_steps), on_step=poison, progress=False)
        lines.append(stopped.value.line())
    assert "not finite after step 2" in lines[0] and "no checkpoint had been written" in lines[0]
    assert "checkpoints before it are kept (the latest: step-0000002)" in lines[1]
    assert all("start a new run" in line and "--resume" not in line for line in lines)


# -- several processes: torch.distributed's own environment, two forked ranks ----------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether a socket of this machine listens on ``port`` (process 0 serves the others' rendezvous there)."""
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for row in table.read_text().splitlines()[1:] if table.exists() else []:
            columns = row.split()
            if columns[1].endswith(f":{port:04X}") and columns[3] == "0A":
                return True
    return False


def rank(monkeypatch, index: int, port: int, *args: str):
    """``tuneforge ARGS`` as process ``index`` of 2, in torchrun's environment, forked at once."""
    for key, value in {"RANK": index, "LOCAL_RANK": index, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2,
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items():
        monkeypatch.setenv(key, str(value))
    return tuneforge(*args)


@pytest.mark.parametrize("shape", ["ddp", "fsdp, evaluating"])
def test_a_killed_process_is_one_line_for_the_others(shape, tmp_path, tiny_dir, monkeypatch):
    """Its peer's next collective fails: one line, exit 3, no backend traceback of forty lines. Under
    FSDP2 an evaluation after every step, most of the run: its forward gathers weights from the peer."""
    sharded = {"fsdp": True, "eval_steps": 1} if shape.startswith("fsdp") else {"eval_steps": 0}
    cfg = config(tmp_path, tiny_dir, train={"max_steps": 400, "save_steps": 2, "grad_accum": 1,
                                            "dist_timeout_s": 60, **sharded})
    port = free_port()
    first, second = rank(monkeypatch, 0, port, "train", str(cfg)), rank(monkeypatch, 1, port, "train", str(cfg))
    deadline = time.time() + 120
    while not checkpoint.complete(tmp_path / "out" / "checkpoints") and first.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    second.send_signal(signal.SIGKILL)
    finish(second)
    code, err = finish(first, timeout=60)
    errors = [line for line in err.splitlines() if line.startswith("tuneforge: error")]
    assert code == 3 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "(process 0): another process of the run stopped or cannot be reached" in errors[0]
    assert checkpoint.complete(tmp_path / "out" / "checkpoints")


def test_sigterm_while_waiting_for_the_other_processes_ends_at_once(tmp_path, tiny_dir, monkeypatch):
    """Joining the process group waits in C++, where no signal handler runs: a SIGTERM there (torchrun
    stopping the run because another process ended before it joined) once waited out the whole timeout,
    until torchrun killed the process 30 s later."""
    cfg = config(tmp_path, tiny_dir, train={"dist_timeout_s": 30})
    port = free_port()
    alone = rank(monkeypatch, 0, port, "train", str(cfg))  # process 1 never comes
    deadline = time.time() + 60
    while not listening(port):
        assert alone.poll() is None and time.time() < deadline, alone.stderr()
        time.sleep(0.01)
    time.sleep(0.2)
    sent = time.time()
    alone.send_signal(signal.SIGTERM)
    code, err = finish(alone, timeout=60)
    assert code == 128 + signal.SIGTERM and time.time() - sent < 5, (time.time() - sent, err)
    assert "tuneforge: interrupted" in err and "Traceback" not in err
