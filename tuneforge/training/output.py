"""A run's output folder: one run at a time, nothing of an earlier run or of the user's mixed in or
overwritten, and a resumed run held to the settings it was started with.

- ``check_folder`` refuses, before anything is created, a folder a run cannot or must not use: a file,
  the current folder or one that holds it, a place that cannot be written.
- ``claim`` takes the folder's lock (``.tuneforge.lock``; a second run into it is refused, naming the
  holder's pid), puts right what a killed run left there (temporary files and folders, only of the
  names the folder's manifest lists), and then refuses a folder that holds anything unless the run
  resumes it, ``overwrite`` moves it aside, or it holds only a start that saved nothing.
- ``begin`` writes the manifest (``.tuneforge.json``): the names tuneforge writes in the folder, and the
  run's record (its resolved config, the sha256 of every data file), which each checkpoint copies.
- ``check_resume`` compares the resumed run with the checkpoint's record and refuses a change that
  alters the result, naming the keys, or data files whose bytes changed; logging, evaluation,
  checkpoint cadence and the step budget may change, and so may the number of processes, with
  ``grad_accum`` keeping the global batch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

from tuneforge.core import config as config_mod
from tuneforge.core.atomic import recover, write_text
from tuneforge.core.config import DataCfg, RunCfg
from tuneforge.core.errors import UserError
from tuneforge.training import checkpoint

LOCK = ".tuneforge.lock"
MANIFEST = checkpoint.MANIFEST
RUN_FILES = {"config.yaml", "metrics.jsonl", "checkpoints", "final", "summary.json", "loss.png"}
# What a start leaves before its first checkpoint: a rerun takes its place
STARTED = {MANIFEST, "config.yaml", "metrics.jsonl", "checkpoints"}
# Keys a resumed run may change: they decide when to log, evaluate, save and stop, not the weights.
RESUMABLE = {"train.logging_steps", "train.eval_steps", "train.eval_at_start", "train.save_steps",
             "train.keep_checkpoints", "train.max_steps", "train.epochs", "train.time_budget_s",
             "train.early_stopping_patience", "train.skip_nonfinite_steps", "train.dist_timeout_s", "eval.batch_size",
             "eval.batch_tokens", "eval.max_examples", "data.max_eval_examples"}


def check_folder(out: Path) -> None:
    """Refuse ``out`` before anything is created where it is a file, the current folder or one that holds
    it (``--overwrite`` would move the folder you work in aside), or where nothing can be written."""
    where = f"train.output_dir ({out})"
    target, here = out.resolve(), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise UserError("this is the current folder, or one that holds it, and a run's folder is its own (with "
                        "--overwrite, what it holds would be moved aside)", where,
                        fix="set train.output_dir to a folder for this run, for example runs/NAME")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{existing} is a file, not a folder", where, fix="set train.output_dir to a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {existing}", where, fix="set train.output_dir to a folder you can write to")


class Claim:
    """The lock on an output folder, held until ``release`` (or the process ends)."""

    def __init__(self, out: Path):
        check_folder(out)
        missing = [p for p in (out, *out.absolute().parents) if not p.exists()]
        self.out, self.created, self._fd = out, missing[-1] if missing else None, None  # the outermost folder made
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._undo()
            raise UserError(f"cannot create or write this folder: {exc.strerror}", f"train.output_dir ({out})",
                            fix="set train.output_dir to a folder you can write to") from None
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
        """Unlock; folders this run made go again if it left nothing in them but the start of a run (it
        stopped on bad input or failed before its first checkpoint), so the rerun finds no trace of it."""
        if self._fd is None:
            return
        self._undo()
        os.close(self._fd)
        self._fd = None

    def _undo(self) -> None:
        if self.created is None:
            return
        left = {p.name for p in self.out.iterdir()} if self.out.is_dir() else set()
        if not left <= {LOCK, MANIFEST, "config.yaml"}:
            return
        for name in left:
            (self.out / name).unlink()
        for folder in (self.out.absolute(), *self.out.absolute().parents):
            with contextlib.suppress(OSError):  # one that something else wrote into stays
                folder.rmdir()
            if folder == self.created.absolute() or folder.exists():
                break


def _written(out: Path) -> set[str] | None:
    """The names the folder's manifest says tuneforge writes there; None where there is no manifest, and
    so no sign that the folder is a run's."""
    try:
        files = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(files) if isinstance(files, list) else None


def _saved_nothing(out: Path, present: list[str], written: set[str] | None) -> bool:
    """Whether ``out`` holds only what a start of tuneforge's leaves before its first checkpoint."""
    checkpoints = out / "checkpoints"
    return (written is not None and set(present) <= STARTED
            and not (checkpoints.is_dir() and any(checkpoints.iterdir())))


def _move_aside(out: Path, names: list[str]) -> None:
    aside = out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir()
    for name in names:
        os.replace(out / name, aside / name)
    print(f"tuneforge: moved what {out} held to {aside}")


def claim(out: Path, resume: bool, overwrite: bool) -> Claim:
    """Lock ``out`` for this run and make sure it holds nothing this run could mix with or destroy."""
    lock = Claim(out)
    try:
        written = _written(out)
        # put right what a killed write left: of the manifest itself (a start killed as it wrote it), and
        # where the manifest shows the folder is tuneforge's, of the names it lists
        recover(out, (written or {MANIFEST}).__contains__)
        if written is not None:
            recover(out / "checkpoints", lambda name: name.startswith(checkpoint.PREFIX))
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        shown = [n for n in present if n != MANIFEST]
        if resume:
            if not (out / "config.yaml").is_file():
                raise UserError("this folder holds no run to resume", str(out), fix="run without --resume")
        elif present and overwrite:
            _move_aside(out, present)
        elif present and _saved_nothing(out, present, written):
            if "metrics.jsonl" in present:  # the steps of a start that failed before its first checkpoint
                _move_aside(out, present)
            else:
                print(f"tuneforge: {out} held only a start that saved nothing ({', '.join(present)}); this run "
                      "takes its place")
        elif present:
            ours = [n for n in shown if n in RUN_FILES]
            what = (f"an earlier run ({', '.join(ours)})" if ours else
                    f"files tuneforge did not write ({', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''})")
            raise UserError(f"this output folder already holds {what}", str(out),
                            fix=("continue the run with --resume, " if ours else "")
                            + "move it aside with --overwrite (nothing is deleted), or set train.output_dir to a "
                              "new folder")
    except BaseException:
        lock.release()
        raise
    return lock


def record(cfg: RunCfg) -> dict:
    """What a run's checkpoints are checked against on resume: its resolved config and its data's hashes."""
    return {"config": json.loads(json.dumps(config_mod.to_dict(cfg))), "data": data_hashes(cfg.data)}


def data_hashes(data: DataCfg) -> dict[str, str]:
    """The sha256 of every file the run reads its data from (each source of a mixture, each file of a
    ``datasets`` folder, the held-out file), streamed."""
    paths = [s.path for s in data.path] if isinstance(data.path, list) else [data.path] if data.path else []
    hashes = {}
    for path in map(Path, [*paths, *([data.eval_path] if data.eval_path else [])]):
        for f in sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]:
            try:
                with open(f, "rb") as fh:
                    hashes[str(f)] = hashlib.file_digest(fh, "sha256").hexdigest()
            except OSError as exc:
                raise UserError(f"cannot read the data file: {exc.strerror}", str(f), fix="check data.path") from None
    return hashes


def begin(out: Path, run: dict) -> None:
    """Write the folder's manifest: the names tuneforge writes here, and the run's ``record``."""
    write_text(out / MANIFEST, json.dumps({"files": sorted(RUN_FILES | {MANIFEST}), **run}, indent=1))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume(cfg: RunCfg, out: Path, world: int = 1, run: dict | None = None) -> None:
    """Refuse to resume with settings or data that change what the run computes, against the latest
    checkpoint's record of its run (config.yaml, for a checkpoint of an older tuneforge: the file may have
    been edited since). ``run`` is this run's ``record``; ``world`` its number of processes: it may differ
    from the checkpoint's if ``grad_accum`` keeps the global batch."""
    run = run or record(cfg)
    latest = checkpoint.complete(out / "checkpoints")[-1]
    state = checkpoint.state_of(latest)  # {} for a pickled or damaged checkpoint: loading it says which
    was_run = state.get("run") if isinstance(state.get("run"), dict) else {}
    if isinstance(was_run.get("config"), dict):
        where = str(latest / checkpoint.STATE)
        recorded = config_mod.from_dict(was_run["config"], source=where)
    else:
        where = str(out / "config.yaml")
        recorded = config_mod.from_yaml(out / "config.yaml")
    old, new = (_flat({k: v for k, v in config_mod.to_dict(c).items() if k != "compare"}) for c in (recorded, cfg))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and k not in RESUMABLE and k not in ("train.output_dir",
                                                                                        "train.grad_accum"))
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:4])
        raise UserError(f"--resume with settings that change the run's result: {shown}", where,
                        fix="resume with the settings the run started with, or start a new run in another "
                            "train.output_dir")
    hashed = was_run.get("data") if isinstance(was_run.get("data"), dict) else {}
    if hashed and (differ := sorted(k for k in hashed.keys() | run["data"].keys()
                                    if hashed.get(k) != run["data"].get(k))):
        raise UserError(f"the data changed since the run started: its sha256 is not the one {latest.name} recorded",
                        differ[0], fix="resume with the data the run trained on, or start a new run in another "
                                       "train.output_dir")
    was = state.get("progress") if isinstance(state.get("progress"), dict) else {}
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
