"""A run's output folder: one run at a time, nothing of an earlier run or of the user's mixed in or
overwritten, and a resumed run held to the settings it was started with.

- ``claim`` takes the folder's lock (``.tuneforge.lock``; a second run into it is refused, naming the
  holder's pid), puts right what a killed run left there (temporary files and folders), and then
  refuses a folder that holds anything unless the run resumes it or ``overwrite`` moves it aside.
- ``check_resume`` compares the resumed run's config with the one it recorded and refuses a change
  that alters the result, naming the keys; logging, evaluation, checkpoint cadence and the step
  budget may change, and so may the number of processes, with ``grad_accum`` keeping the global batch.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from tuneforge.core import config as config_mod
from tuneforge.core.atomic import recover
from tuneforge.core.config import RunCfg
from tuneforge.core.errors import UserError
from tuneforge.training import checkpoint

LOCK = ".tuneforge.lock"
RUN_FILES = {"config.yaml", "metrics.jsonl", "checkpoints", "final", "summary.json", "loss.png"}
# Keys a resumed run may change: they decide when to log, evaluate, save and stop, not the weights.
RESUMABLE = {"train.logging_steps", "train.eval_steps", "train.eval_at_start", "train.save_steps",
             "train.keep_checkpoints", "train.max_steps", "train.epochs", "train.time_budget_s",
             "train.early_stopping_patience", "train.skip_nonfinite_steps", "train.dist_timeout_s", "eval.batch_size",
             "eval.max_examples", "data.max_eval_examples"}


class Claim:
    """The lock on an output folder, held until ``release`` (or the process ends)."""

    def __init__(self, out: Path):
        self.out, self.created = out, not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise UserError(f"another run (pid {holder}) is writing to this folder", str(out),
                            fix="wait for it to finish, or set train.output_dir to another folder") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        """Unlock; a folder this run created and left empty (it stopped on bad input) goes again."""
        if self._fd is None:
            return
        if self.created and [p.name for p in self.out.iterdir()] == [LOCK]:
            (self.out / LOCK).unlink()
            self.out.rmdir()
        os.close(self._fd)
        self._fd = None


def claim(out: Path, resume: bool, overwrite: bool) -> Claim:
    """Lock ``out`` for this run and make sure it holds nothing this run could mix with or destroy."""
    lock = Claim(out)
    try:
        for folder in (out, out / "checkpoints"):
            recover(folder)
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if resume:
            if not (out / "config.yaml").is_file():
                raise UserError("this folder holds no run to resume", str(out), fix="run without --resume")
        elif present and overwrite:
            aside = out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
            aside.mkdir()
            for name in present:
                os.replace(out / name, aside / name)
            print(f"tuneforge: moved what {out} held to {aside}")
        elif present:
            ours = [n for n in present if n in RUN_FILES]
            what = (f"an earlier run ({', '.join(ours)})" if ours else
                    f"files tuneforge did not write ({', '.join(present[:3])}{', ...' if len(present) > 3 else ''})")
            raise UserError(f"this output folder already holds {what}", str(out),
                            fix="continue a run with --resume, move it aside with --overwrite, or set "
                                "train.output_dir to a new folder")
    except BaseException:
        lock.release()
        raise
    return lock


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume(cfg: RunCfg, out: Path, world: int = 1) -> None:
    """Refuse to resume with settings that change what the run computes. ``world`` is this run's number
    of processes: it may differ from the checkpoint's if ``grad_accum`` keeps the global batch."""
    recorded = config_mod.from_yaml(out / "config.yaml")
    old, new = (_flat({k: v for k, v in config_mod.to_dict(c).items() if k != "compare"}) for c in (recorded, cfg))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and k not in RESUMABLE and k not in ("train.output_dir",
                                                                                        "train.grad_accum"))
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:4])
        raise UserError(f"--resume with settings that change the run's result: {shown}", str(out / "config.yaml"),
                        fix="resume with the settings the run started with, or start a new run in another "
                            "train.output_dir")
    try:
        was = json.loads((checkpoint.complete(out / "checkpoints")[-1] / checkpoint.STATE).read_text())["progress"]
    except (OSError, ValueError, KeyError):  # a pickled or damaged checkpoint: loading it says which
        was = {}
    # The checkpoint's own record: config.yaml is rewritten at every start, even one that saved nothing
    then, batch = was.get("world", 1), cfg.train.batch_size
    before = was.get("global_batch") or batch * recorded.train.grad_accum * then
    now = batch * cfg.train.grad_accum * world
    if before != now:
        per, accum = before / (batch * world), before // (batch * then)
        fix = f"set train.grad_accum to {int(per)}, or" if per == int(per) else "or"
        raise UserError(f"--resume with train.grad_accum {cfg.train.grad_accum} x {_processes(world)}: a global "
                        f"batch of {now} examples; the run trained with {before} (grad_accum {accum} x "
                        f"{_processes(then)})", str(out / "config.yaml"),
                        fix=f"{fix} resume with {_processes(then)} and grad_accum {accum}")


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")
