"""The runs folder as the page sees it: each run's status, figures and log, and the child processes
the page launches (``tuneforge train CONFIG``, ``--resume``) and stops (SIGINT, as Ctrl-C does).

A run's folder (RUNS/NAME) is written by the run alone: ``tuneforge train`` refuses a folder that
already holds anything. So what the page keeps about a run it launched lives beside it, in
RUNS/.ui/NAME/: config.yaml (the resolved config it launched, written atomically), log.txt (the
child's output) and launch.json (each launch's command, pid and exit code).

Status: running (the page's child is alive, or the run's lock is held), finished (summary.json),
interrupted (a complete checkpoint, no summary), failed (no checkpoint, and the child exited
non-zero or never made the folder). Every reader tolerates a folder that changes or goes while it
reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from tuneforge.core.atomic import write_text
from tuneforge.core.errors import UserError
from tuneforge.training import metrics as metrics_mod
from tuneforge.training.checkpoint import complete
from tuneforge.training.output import LOCK

SIDE = ".ui"  # RUNS/.ui/NAME: what the page keeps about the runs it launched
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
LOG_TAIL = 40  # lines of a run's log shown on its page


def inside(path: str | Path, roots: list[Path]) -> Path | None:
    """``path`` resolved (links followed), if it lies inside one of ``roots``; else None."""
    resolved = Path(path).expanduser().resolve()
    return resolved if any(resolved == r or resolved.is_relative_to(r) for r in roots) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def lock_holder(folder: Path) -> int | None:
    """The pid of the run writing ``folder``, if one is: its lock file names a live process that
    holds the lock. (A probe is taken only when that process lives, so a run starting in a folder a
    dead run left is never kept from its lock.)"""
    try:
        pid = int((folder / LOCK).read_text().strip() or 0)
        if not _pid_alive(pid):
            return None
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except (OSError, ValueError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return pid
    finally:
        os.close(fd)  # closing it drops the probe's lock, if it got one
    return None


def _exit_text(code) -> str:
    if isinstance(code, int) and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_yaml(path: Path) -> dict | None:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def log_tail(path: Path, lines: int = LOG_TAIL) -> str:
    """The last lines of a child's output; a progress bar's carriage returns keep its last state."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(shown[-lines - 1:]).strip("\n")


class Runs:
    """The runs under ``root`` and the children this page launched into it."""

    def __init__(self, root: str | Path, cwd: str | Path | None = None):
        self.root = Path(root).resolve()
        self.cwd = Path(cwd or os.getcwd()).resolve()  # where children run, and relative paths start
        self.root.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._metrics_cache: dict[Path, tuple[tuple, list[dict], int]] = {}

    # --- names and folders -------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        """RUNS/NAME for a run name the page may use: one plain path component, nothing that escapes."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UserError(f"{name!r} is not a run name", "run name",
                            fix="use letters, digits, '.', '_' and '-', starting with a letter or digit")
        return self.root / name

    def side(self, name: str) -> Path:
        return self.root / SIDE / self.folder(name).name

    def names(self) -> list[str]:
        """Every run: a folder under RUNS holding a run's files (a compare folder is not one), and
        every run the page launched, even one whose folder is not there (yet, or any more)."""
        found = set()
        for base in (self.root, self.root / SIDE):
            with contextlib.suppress(OSError):
                found.update(p.name for p in base.iterdir() if p.is_dir() and NAME.fullmatch(p.name))
        return sorted(n for n in found if (self.root / SIDE / n).is_dir() or self._is_run(self.root / n))

    @staticmethod
    def _is_run(folder: Path) -> bool:
        return not (folder / "compare.md").exists() and any(
            (folder / f).exists() for f in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", LOCK))

    def display(self, path: str | Path) -> str:
        """A path as configs and the page write it: relative to the working folder when inside it."""
        path = Path(path).resolve()
        return str(path.relative_to(self.cwd)) if path.is_relative_to(self.cwd) else str(path)

    # --- what a run wrote --------------------------------------------------------------------
    def config_path(self, name: str) -> Path | None:
        """The run's own config.yaml, else the one the page launched it with."""
        for path in (self.folder(name) / "config.yaml", self.side(name) / "config.yaml"):
            if path.is_file():
                return path
        return None

    def metrics(self, name: str) -> tuple[list[dict], int]:
        """(metrics.jsonl's records, lines dropped as torn or malformed); read again only when it changed."""
        path = self.folder(name) / "metrics.jsonl"
        try:
            st = path.stat()
        except OSError:
            return [], 0
        key = (st.st_mtime_ns, st.st_size)
        cached = self._metrics_cache.get(path)
        if cached and cached[0] == key:
            return cached[1], cached[2]
        records, dropped = metrics_mod.read(path)
        self._metrics_cache[path] = (key, records, dropped)
        return records, dropped

    def launches(self, name: str) -> list[dict]:
        record = _read_json(self.side(name) / "launch.json") or {}
        return record.get("launches") if isinstance(record.get("launches"), list) else []

    def running(self, name: str) -> int | None:
        """The pid of the process running this run (the page's child, or whoever holds its lock)."""
        with self._lock:
            child = self._children.get(name)
        if child is not None and child.poll() is None:
            return child.pid
        return lock_holder(self.folder(name))

    def status(self, name: str) -> tuple[str, str]:
        """(running | finished | interrupted | failed, a sentence saying what the files show)."""
        folder = self.folder(name)
        pid = self.running(name)
        if pid is not None:
            return "running", f"process {pid}" + ("" if folder.is_dir() else " is starting")
        launches = self.launches(name)
        last = launches[-1] if launches else {}
        code = last.get("exit")
        ended = "" if code is None else f"; the last launch {_exit_text(code)}"
        if not folder.is_dir():
            if launches and code == 0:
                return "failed", "the run's folder is gone (deleted?)"
            return "failed", "the run never made its folder" + ended + "; its log says why"
        if (folder / "summary.json").is_file():
            return "finished", "summary.json written"
        if checkpoints := complete(folder / "checkpoints"):
            return "interrupted", f"stopped after {checkpoints[-1].name}{ended}; Resume continues from there"
        return "failed", "no checkpoint" + (ended or "; no process is writing it")

    def row(self, name: str) -> dict:
        """One line of the Runs page: method, data, status, steps, best metric, elapsed time."""
        status, detail = self.status(name)
        path = self.config_path(name)
        cfg = (_read_yaml(path) if path else None) or {}
        method = cfg.get("method", {})
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        summary = _read_json(self.folder(name) / "summary.json") or {}
        records, _ = self.metrics(name)
        accuracies = [r["eval_accuracy"] for r in records if isinstance(r.get("eval_accuracy"), (int, float))]
        losses = [r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), (int, float))]
        after = summary.get("after") if isinstance(summary.get("after"), dict) else {}
        if accuracies or "accuracy" in after:
            best = ("accuracy", max(accuracies + ([after["accuracy"]] if "accuracy" in after else [])))
        elif losses:
            best = ("eval loss", min(losses))
        else:
            best = None
        seconds = summary.get("seconds", next((r["seconds"] for r in reversed(records) if "seconds" in r), None))
        steps = summary.get("steps", records[-1]["step"] if records else None)
        return {"name": name, "method": method.get("name") if isinstance(method, dict) else method,
                "data": data_name(data.get("path")), "status": status,
                "detail": detail, "steps": steps, "max_steps": (cfg.get("train") or {}).get("max_steps"),
                "best": best, "seconds": seconds, "classification": data.get("format") == "classification",
                "has_result": (self.folder(name) / "final").is_dir()}

    def summary(self, name: str) -> dict | None:
        return _read_json(self.folder(name) / "summary.json")

    def log(self, name: str) -> str:
        return log_tail(self.side(name) / "log.txt")

    # --- launching and stopping --------------------------------------------------------------
    def start(self, name: str, cfg_yaml: str) -> None:
        """Write the resolved config beside the run's folder and launch ``tuneforge train`` on it."""
        folder, side = self.folder(name), self.side(name)
        if side.exists() or (folder.exists() and any(folder.iterdir())):
            raise UserError(f"there is already a run named {name!r}", self.display(folder),
                            fix="choose another run name")
        write_text(side / "config.yaml", cfg_yaml)
        self._launch(name, ["train", self.display(side / "config.yaml")])

    def resume(self, name: str) -> None:
        """``tuneforge train CONFIG --resume`` on the config the run recorded, into its own folder."""
        folder = self.folder(name)
        if self.running(name) is not None:
            raise UserError("this run is still running", self.display(folder), fix="stop it first")
        if not complete(folder / "checkpoints") or not (folder / "config.yaml").is_file():
            raise UserError("this run has no checkpoint to resume from", self.display(folder),
                            fix="start a new run with its settings")
        self._launch(name, ["train", self.display(folder / "config.yaml"), "--resume", "--set",
                            f"train.output_dir={self.display(folder)}"])

    def stop(self, name: str) -> int:
        """SIGINT to the run's process: it saves a checkpoint and exits 130, as after Ctrl-C."""
        pid = self.running(name)
        if pid is None:
            raise UserError("this run is not running", self.display(self.folder(name)))
        with self._lock:
            child = self._children.get(name)
        if child is not None and child.pid == pid:
            child.send_signal(signal.SIGINT)
        else:
            os.kill(pid, signal.SIGINT)
        return pid

    def _launch(self, name: str, args: list[str]) -> None:
        side = self.side(name)
        command = [sys.executable, "-m", "tuneforge", *args]
        with self._lock:
            if (old := self._children.get(name)) is not None and old.poll() is None:
                raise UserError("this run is still running", self.display(self.folder(name)), fix="stop it first")
            side.mkdir(parents=True, exist_ok=True)
            with open(side / "log.txt", "ab") as log:
                log.write(f"$ tuneforge {' '.join(args)}\n".encode())
                log.flush()
                # No shell; a session of its own, so that Ctrl-C on the page's terminal leaves the run be.
                child = subprocess.Popen(command, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self._children[name] = child
            launches = self.launches(name) + [{"command": ["tuneforge", *args], "pid": child.pid,
                                               "started": time.time(), "exit": None}]
            self._record(side, launches)
        threading.Thread(target=self._reap, args=(name, child), daemon=True).start()

    def _reap(self, name: str, child: subprocess.Popen) -> None:
        code = child.wait()
        with self._lock:
            launches = self.launches(name)
            for launch in launches:
                if launch.get("pid") == child.pid and launch.get("exit") is None:
                    launch.update(exit=code, ended=time.time())
            with contextlib.suppress(OSError, UserError):  # the runs folder may be gone
                self._record(self.side(name), launches)

    @staticmethod
    def _record(side: Path, launches: list[dict]) -> None:
        write_text(side / "launch.json", json.dumps({"launches": launches}, indent=1))

    def wait(self, name: str, timeout: float | None = None) -> int | None:
        """Wait for the page's child for this run to exit (tests, and closing the server); its code."""
        with self._lock:
            child = self._children.get(name)
        if child is None:
            return None
        code = child.wait(timeout)
        deadline = time.monotonic() + 5
        while self.launches(name) and self.launches(name)[-1].get("exit") is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the reaper writes launch.json just after the exit
        return code


def data_name(path) -> str | None:
    """The training data as the run list shows it: a file's name, or a mixture's file names joined."""
    if isinstance(path, list):  # a mixture: each source's path
        return " + ".join(Path(str(source.get("path") if isinstance(source, dict) else source)).name for source in path)
    return Path(str(path)).name if path else None
