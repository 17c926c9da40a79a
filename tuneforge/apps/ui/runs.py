"""The runs folder as the page sees it: each run's status, figures and log, and the child processes
the page launches (``tuneforge train CONFIG``, ``--resume``) and stops (SIGINT, as Ctrl-C does).

A run's folder (RUNS/NAME) is written by the run alone: ``tuneforge train`` refuses a folder that
already holds anything. So what the page keeps about a run it launched lives beside it, in
RUNS/.ui/NAME/: config.yaml (the resolved config it launched, written atomically), log.txt (the
child's output) and launch.json (each launch's command, pid, the process's start time and exit code).

Status: running (the page's child or an earlier page's is alive, or the run's lock is held),
finished (summary.json), interrupted (a complete checkpoint, no summary), failed (no checkpoint, and
the child exited non-zero or never made the folder). Every reader tolerates a folder that changes or
goes while it reads, and files of any shape in it.

The page acts only inside the runs folder and only on processes a page started: a link there (a run
folder, RUNS/.ui, a file in a run) is never followed, and Stop signals the page's own children, or a
child an earlier page launched once /proc shows it is that very process (see ``Runs.earlier_child``),
never a pid a lock file names, since anyone who can write the runs folder can write that pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

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


def own(path: Path) -> Path | None:
    """``path`` (absolute, under a resolved root) if no link leads to it, else None: a run's files are
    read where they are, never through a link to somewhere else."""
    return path if path.resolve() == path else None


def first_link(folder: Path) -> Path | None:
    """A link at or under ``folder``, if there is one: a run the page resumes or loads must hold none,
    or the child would write, or the page read, through it."""
    if folder.is_symlink():
        return folder
    for parent, dirs, files in os.walk(folder):
        for entry in (*dirs, *files):
            if os.path.islink(os.path.join(parent, entry)):
                return Path(parent, entry)
    return None


def read_text(path: Path, tail: int | None = None) -> str | None:
    """A plain file's text (its last ``tail`` bytes), or None: never through a link at its name (its
    folder is checked by ``Runs.inside``), never a FIFO or a device, whose read would hang the page."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        if tail:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
        return f.read().decode("utf-8", errors="replace")


def finite(value) -> bool:
    """A number the page can show (a NaN loss in metrics.jsonl is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def proc_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (field 22 of /proc/PID/stat); None where
    /proc has no such process (or no /proc). With the pid it names one process: a pid used again is a
    process that started later."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        return int(text[text.rindex(")") + 2:].split()[19])  # the name, field 2, is in parentheses
    except (OSError, ValueError, IndexError):
        return None


def proc_command(pid: int) -> tuple[list[str], Path] | None:
    """(the command line, the working folder) of process ``pid``, from /proc; None where it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None
    return raw.decode("utf-8", errors="replace").split("\0")[:-1], cwd


def lock_holder(folder: Path) -> int | None:
    """The pid of the run writing ``folder``, if one is: its lock file names a live process that
    holds the lock. (A probe is taken only when that process lives, so a run starting in a folder a
    dead run left is never kept from its lock.)"""
    try:
        pid = int((read_text(folder / LOCK) or "0").strip() or 0)
        if not _pid_alive(pid):
            return None
        fd = os.open(folder / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (OSError, ValueError, OverflowError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return pid
    finally:
        os.close(fd)  # closing it drops the probe's lock, if it got one
    return None


def _signal_checked(pid: int, signum: int, check: Callable[[], bool]) -> bool:
    """Send ``signum`` to process ``pid`` if ``check()`` holds once a pidfd on it is open: a pid used
    again after the check cannot get the signal. False (nothing sent) where it does not hold, the
    process is gone, or the system has no pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return False
    try:
        if not check():
            return False
        signal.pidfd_send_signal(fd, signum)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _exit_text(code) -> str:
    if isinstance(code, int) and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(read_text(path) or "null")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python reads
        return None
    return value if isinstance(value, dict) else None


def _read_yaml(path: Path) -> dict | None:
    try:
        value = yaml.safe_load(read_text(path) or "")
    except (ValueError, RecursionError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def _section(cfg: dict, key: str) -> dict:
    value = cfg.get(key)
    return value if isinstance(value, dict) else {}


def log_tail(path: Path, lines: int = LOG_TAIL) -> str:
    """The last lines of a child's output; a progress bar's carriage returns keep its last state."""
    text = read_text(path, tail=64 * 1024) or ""
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
        """RUNS/NAME for a run name the page may use: one plain path component, nothing that escapes,
        and not a link (through which a run would be read, resumed or written elsewhere)."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UserError(f"{name!r} is not a run name", "run name",
                            fix="use letters, digits, '.', '_' and '-', starting with a letter or digit")
        return self.inside(self.root / name)

    def side(self, name: str) -> Path:
        return self.inside(self.root / SIDE / self.folder(name).name)

    def inside(self, path: Path) -> Path:
        """``path`` under RUNS, refused (naming the link) when a link leads to it."""
        if own(path) is None:
            link = next((p for p in reversed([path, *path.parents]) if p.is_symlink()), path)  # from RUNS down
            raise UserError("a link, which this page does not follow",
                            f"{self.display(self.root)}/{link.relative_to(self.root)}",
                            fix="move what it points to into the runs folder, or remove the link")
        return path

    def names(self) -> list[str]:
        """Every run: a folder under RUNS holding a run's files (a compare folder is not one), and
        every run the page launched, even one whose folder is not there (yet, or any more); links and
        what lies behind them are not runs."""
        side, found = self.inside(self.root / SIDE), set()
        for base in (self.root, side):
            with contextlib.suppress(OSError):
                found.update(p.name for p in base.iterdir() if NAME.fullmatch(p.name) and own(p) and p.is_dir())
        return sorted(n for n in found if own(self.root / n) and own(side / n)
                      and ((side / n).is_dir() or self._is_run(self.root / n)))

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
            if path.is_file() and not path.is_symlink():
                return path
        return None

    def config_text(self, name: str) -> str | None:
        path = self.config_path(name)
        return read_text(path) if path else None

    def metrics(self, name: str) -> tuple[list[dict], int]:
        """(metrics.jsonl's records, lines dropped as torn or malformed); read again only when it changed."""
        path = self.folder(name) / "metrics.jsonl"
        try:
            st = path.lstat()
        except OSError:
            return [], 0
        if not stat.S_ISREG(st.st_mode):  # a link, a FIFO: not what a run writes
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
        launches = record.get("launches") if isinstance(record.get("launches"), list) else []
        return [launch for launch in launches if isinstance(launch, dict)]

    def child(self, name: str) -> subprocess.Popen | None:
        """This page's own child running this run, if it is alive: the one process Stop may signal."""
        with self._lock:
            child = self._children.get(name)
        return child if child is not None and child.poll() is None else None

    def earlier_child(self, name: str) -> int | None:
        """The pid of the child an earlier page (an earlier `tuneforge ui` on this runs folder) launched for
        this run, if that very process still runs: launch.json's last launch has no exit code, and /proc
        shows the process with its pid started when it recorded (so the pid was not used again), runs
        the command the page launches for this run, and runs in this page's working folder. Else None,
        as where there is no /proc."""
        launches = self.launches(name)
        last = launches[-1] if launches else {}
        pid, ticks = last.get("pid"), last.get("ticks")
        if last.get("exit") is not None or type(pid) is not int or pid <= 0 or type(ticks) is not int:
            return None
        if last.get("command") not in (["tuneforge", *args] for args in self._commands(name)):
            return None
        if proc_start(pid) != ticks:
            return None
        seen = proc_command(pid)
        if seen is None or seen[0][1:] != ["-m", *last["command"]] or seen[1] != self.cwd:
            return None
        return pid

    def running(self, name: str) -> int | None:
        """The pid of the process running this run (the page's child, an earlier page's, or whoever holds
        its lock)."""
        child = self.child(name)
        if child is not None:
            return child.pid
        return self.earlier_child(name) or lock_holder(self.folder(name))

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
        method, data = cfg.get("method", {}), _section(cfg, "data")
        summary = self.summary(name) or {}
        records, _ = self.metrics(name)
        best = _best(r for r in records if not (finite(r.get("step")) and r["step"] < 1))
        after = _section(summary, "after")
        if finite(after.get("accuracy")) and (best is None or best[0] != "accuracy" or after["accuracy"] > best[1]):
            best = ("accuracy", after["accuracy"])
        if best is None and (before := _best(records)) is not None:  # only train.eval_at_start's, at step 0
            best = (f"{before[0]} before training", before[1])
        seconds = summary.get("seconds", next((r["seconds"] for r in reversed(records) if "seconds" in r), None))
        steps = summary.get("steps", records[-1]["step"] if records else None)
        return {"name": name, "method": method.get("name") if isinstance(method, dict) else method,
                "data": data_name(data.get("path")), "status": status,
                "detail": detail, "steps": steps, "max_steps": _section(cfg, "train").get("max_steps"),
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
        self._launch(name, self._commands(name)[0])

    def resume(self, name: str, check: Callable[[Path], None]) -> None:
        """``tuneforge train CONFIG --resume`` on the config the run recorded, into its own folder, once
        ``check`` has passed that config."""
        folder = self.folder(name)
        if self.running(name) is not None:
            raise UserError("this run is still running", self.display(folder), fix="stop it first")
        if (folder / "summary.json").is_file():
            raise UserError("this run is finished (its summary.json is written): there is nothing to resume",
                            self.display(folder), fix="start a new run with its settings to train again")
        if (link := first_link(folder)) is not None:
            raise UserError("a link in the run's folder, which this page does not follow (the run would write "
                            "through it)", self.display(link.parent) + "/" + link.name,
                            fix="resume it from a terminal if the link is meant to be there")
        if not complete(folder / "checkpoints") or not (folder / "config.yaml").is_file():
            raise UserError("this run has no checkpoint to resume from", self.display(folder),
                            fix="start a new run with its settings")
        check(folder / "config.yaml")
        self._launch(name, self._commands(name)[1])

    def _commands(self, name: str) -> list[list[str]]:
        """The two commands the page launches for a run (after ``tuneforge``): start, and resume."""
        folder = self.folder(name)
        return [["train", self.display(self.side(name) / "config.yaml")],
                ["train", self.display(folder / "config.yaml"), "--resume", "--set",
                 f"train.output_dir={self.display(folder)}"]]

    def stop(self, name: str) -> int:
        """SIGINT to the run's process, as Ctrl-C: it saves a checkpoint and exits 130. The process is this
        page's child, or the child an earlier page launched (``earlier_child``; the signal goes through a
        pidfd opened before that check, so it reaches that process or none). A run another process
        started is stopped where it runs: the pid its lock file names is whatever that file says."""
        child = self.child(name)
        if child is not None:
            child.send_signal(signal.SIGINT)
            return child.pid
        pid = self.earlier_child(name)
        if pid is not None and _signal_checked(pid, signal.SIGINT, lambda: self.earlier_child(name) == pid):
            return pid
        raise self.not_stoppable(name)

    def not_stoppable(self, name: str) -> UserError:
        """Why Stop cannot act on this run, and what will stop it."""
        pid = self.running(name)
        if pid is None:
            return UserError("this run is not running", self.display(self.folder(name)))
        return UserError("this run was not started by this page (nor by an earlier page, in a process it can "
                         "verify)", self.display(self.folder(name)),
                         fix=f"its lock names process {pid}: if that is the run, kill -INT {pid} stops it and saves "
                             "a checkpoint, as Ctrl-C in the terminal it was started in does")

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
                                               "ticks": proc_start(child.pid), "started": time.time(), "exit": None}]
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


def _best(records) -> tuple[str, float] | None:
    """The best held-out figure of ``records``: the highest accuracy, else the lowest evaluation loss."""
    records = list(records)
    accuracies = [r["eval_accuracy"] for r in records if finite(r.get("eval_accuracy"))]
    losses = [r["eval_loss"] for r in records if finite(r.get("eval_loss"))]
    return ("accuracy", max(accuracies)) if accuracies else ("eval loss", min(losses)) if losses else None


def data_name(path) -> str | None:
    """The training data as the run list shows it: a file's name, or a mixture's file names joined."""
    if isinstance(path, list):  # a mixture: each source's path
        return " + ".join(Path(str(source.get("path") if isinstance(source, dict) else source)).name for source in path)
    return Path(str(path)).name if path else None
