"""`tuneforge compare`: several methods on one task, split and seed, side by side.

Each row runs in its own process (so its peak memory is its own, and a crash stays a row with its
error) and reports accuracy, macro-F1, trainable parameters, peak memory, training time, inference
time per example and artifact size; with ``compare.transfer_path`` also accuracy on a second domain.
In-context rows (``zero-shot``, ``few-shot``) train nothing. Writes compare.md, compare.csv and
compare.png (accuracy against trainable parameters).

Every row is checked before the first one runs (``rows``; `tuneforge config` checks them too), and the
config.yaml beside the table holds the rows as they ran, each default filled in. Model code loads only
when a row runs, so checking a comparison is quick. An error in a row names the row and, given ``places``
(``row_places``), the file and line of its key, or the ``--set`` that gave the rows.

Ctrl-C (or SIGTERM) stops a comparison with one line naming the rows that finished (compare.md and
compare.csv hold them) and exit code 130 (143): the row processes start with both signals blocked and take
them with ``sigwait``, so a Ctrl-C to the process group ends a row at once, without a traceback or the
training loop's checkpoint line; compare passes a signal sent to it alone on to the row. A comparison is
not continued: it runs again in a new folder.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import multiprocessing
import os
import re
import resource
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import yaml

from tuneforge.core import config as config_mod
from tuneforge.core.atomic import atomic_path, write_text
from tuneforge.core.config import RunCfg, TrainCfg, Where, build, line_numbers
from tuneforge.core.config.methods import METHODS
from tuneforge.core.errors import UserError
from tuneforge.training.interrupts import Interrupted

ICL_ROWS = {"zero-shot", "few-shot"}
ICL_KEYS = {"shots", "mode", "strategy", "calibrate"}
ZERO_SHOT_KEYS = {"mode", "calibrate"}  # a zero-shot row has no demonstrations to count or choose
STOPS = {signal.SIGINT, signal.SIGTERM}  # each stops a comparison: Ctrl-C, and what schedulers send
COLUMNS = ["label", "method", "accuracy", "macro_f1", "transfer_accuracy", "trainable_params", "peak_memory_mb",
           "train_seconds", "infer_ms_per_example", "artifact_mb", "error"]


@dataclass(frozen=True)
class InContext:
    """The keys of an in-context row, as `tuneforge icl` takes them."""

    shots: int = 4  # demonstrations per prompt (few-shot)
    mode: Literal["chat", "chat_turns", "raw"] = "chat"
    strategy: Literal["random", "nearest"] = "random"
    calibrate: bool = False

    def __post_init__(self):
        if self.shots < 1:
            raise UserError(f"shots must be at least 1, got {self.shots}", "shots", fix="use the zero-shot row for 0")


class RowsFailed(UserError):
    """Rows of a finished comparison that failed (the table holds every row, an error column for these):
    the CLI exits with code 1."""

    exit_code = 1


@dataclass(frozen=True)
class Places:
    """Where the rows of ``compare.methods`` were written, for their errors: ``source`` is the YAML file, or
    ``--set compare.methods`` when the command line gave the rows; ``lines`` holds each row's lines, by the
    key as the row writes it (``name``, ``r``, ``train.learning_rate``; ``""``: the row's first line)."""

    source: str | None = None
    lines: tuple[Mapping[str, int], ...] = ()

    def row(self, i: int, label: str) -> RowWhere:
        return RowWhere(label, self.source, self.lines[i] if i < len(self.lines) else None)

    def methods(self, i: int) -> str:
        """Names row ``i`` as a value of ``compare.methods``, where no row's name is to blame."""
        if self.source is None or self.source.startswith("--set "):
            return self.source or "compare.methods"
        line = self.lines[i].get("") if i < len(self.lines) else None
        return f"{self.source}:{line}: key 'compare.methods'" if line else f"{self.source}: key 'compare.methods'"


def row_places(path: str | Path, overrides: list[str] = ()) -> Places:
    """Where the rows of the comparison in the YAML file ``path``, with ``--set`` ``overrides``, were written."""
    keys = [item.partition("=")[0].strip() for item in overrides]
    given = [key for key in keys if key in ("compare", "compare.methods")]
    if given:  # the last such --set replaced the rows the file holds
        return Places(f"--set {given[-1]}")
    try:
        lines = line_numbers(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return Places(str(path))
    rows, i = [], 0
    while (head := f"compare.methods.{i}") in lines:  # each row's keys as it writes them, "" its first line
        rows.append({"": lines[head], **{k[len(head) + 1:]: v for k, v in lines.items() if k.startswith(head + ".")}})
        i += 1
    return Places(str(path), tuple(rows))


class RowWhere(Where):
    """Names a key of one compare row: ``FILE:LINE: compare row 'LABEL': key 'k'``, where LINE is the line of the
    key as the row writes it (a method key ``method.r`` as ``r``), else the row's first line; with the
    rows from ``--set``, ``--set compare.methods: compare row ...``; without a source, ``compare row ...``."""

    def __init__(self, label: str, file: str | None = None, lines: Mapping[str, int] | None = None):
        super().__init__(f"compare row {label!r}", lines)
        self.file = file

    def place(self, written: str = "") -> str:
        """The file and line of the row's key ``written`` (the row's first line where the row does not write
        it), as the start of an error's where."""
        if self.file is None:
            return ""
        line = self.lines.get(written) or self.lines.get("")
        return f"{self.file}:{line}: " if line else f"{self.file}: "

    def __call__(self, key: str) -> str:
        return f"{self.place(key.removeprefix('method.'))}{self.source}: key '{key}'"

    @property
    def row(self) -> str:
        """The row itself, where no key of it is to blame."""
        return f"{self.place()}{self.source}"


def row_label(row: dict) -> str:
    if "label" in row:
        return str(row["label"])
    keys = {k: v for k, v in row.items() if k not in ("name", "train")}
    return row["name"] + ("" if not keys else " " + " ".join(f"{k}={v}" for k, v in keys.items()))


def row_config(cfg: RunCfg, row: dict, out: Path, where: RowWhere | None = None) -> RunCfg:
    """The run configuration of one row: the shared one, with the row's method and train overrides. An
    error in the row's method or train keys is named by ``where`` (default: the row, without a place)."""
    where = where or RowWhere(row_label(row))
    raw = config_mod.to_dict(dataclasses.replace(cfg, compare=config_mod.CompareCfg()))
    method = {k: v for k, v in row.items() if k not in ("label", "train") and k not in ICL_KEYS}
    raw["method"] = {} if row["name"] in ICL_ROWS else method  # in-context rows train nothing: no method
    raw["train"] = {**raw["train"], **row.get("train", {}), "output_dir": str(out)}
    # the row's own keys first, each named where the row wrote it; then the whole, its sections together
    build(TrainCfg, raw["train"], where, prefix="train.")
    if raw["method"]:
        build(METHODS[row["name"]].config, {k: v for k, v in method.items() if k != "name"}, where, prefix="method.")
    return config_mod.from_dict(raw, source=where.row)


def rows(cfg: RunCfg, places: Places | None = None) -> list[dict]:
    """Every row of ``cfg.compare.methods``, checked before any runs (its method's keys and types, its
    train overrides, an in-context row's keys, a key its kind would ignore), with its label and every
    default filled in: the rows as they run. A UserError names the first row that is wrong, and with
    ``places`` (``row_places``) where it was written."""
    if not cfg.compare.methods:
        raise UserError("no methods to compare", "compare.methods", fix="list rows such as {name: lora, r: 16}")
    places = places or Places()
    resolved = []
    for i, row in enumerate(cfg.compare.methods):
        if not isinstance(row.get("name"), str):
            raise UserError(f"a row without a method name: {row}", places.methods(i), fix="give each row a name")
        label = row_label(row)
        where = places.row(i, label)
        if row["name"] not in METHODS and row["name"] not in ICL_ROWS:
            choices = [*METHODS, "zero-shot", "few-shot"]
            close = difflib.get_close_matches(row["name"], choices, n=1)
            raise UserError(f"unknown method {row['name']!r}", where("name"),
                            fix=(f"did you mean {close[0]!r}? " if close else "") + f"use one of {', '.join(choices)}"
                                + " (zero-shot and few-shot prompt the model and train nothing)")
        if not isinstance(row.get("train", {}), dict):
            raise UserError(f"train must be a mapping of train keys, got {row['train']!r}", where("train"),
                            fix="write train: {learning_rate: 1.0e-3}")
        checked = row_config(cfg, row, Path(cfg.compare.output_dir), where)  # its method and train keys, typed
        if row["name"] in ICL_ROWS:
            allowed = ICL_KEYS if row["name"] == "few-shot" else ZERO_SHOT_KEYS
            if extra := sorted(set(row) - allowed - {"name", "label", "train"}):
                raise UserError(f"an in-context row takes no key {extra[0]!r}", where(extra[0]),
                                fix=f"give {row['name']} only {', '.join(sorted(allowed))} (and label, train)")
            icl = dataclasses.asdict(build(InContext, {k: row[k] for k in allowed if k in row}, where))
            keys = {k: v for k, v in icl.items() if k in allowed}
        else:
            if extra := sorted(ICL_KEYS & set(row)):
                raise UserError(f"{extra[0]} is a key of the in-context rows, and a {row['name']} row would ignore "
                                "it", where(extra[0]), fix=f"drop {extra[0]}")
            keys = dict(checked.method.args)
        train = {"train": row["train"]} if row.get("train") else {}
        resolved.append({"name": row["name"], "label": label, **keys, **train})
    return resolved


def as_compared(cfg: RunCfg, places: Places | None = None) -> str:
    """``cfg`` as YAML as compare runs it: the rows filled in (``rows``), without the keys compare does not
    read (the run's method section and train.output_dir, which each row sets)."""
    raw = config_mod.to_dict(cfg)
    del raw["method"], raw["train"]["output_dir"]
    raw["compare"]["methods"] = rows(cfg, places)
    return yaml.safe_dump(raw, sort_keys=False)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "row"


def _transfer_cfg(cfg: RunCfg, path: str) -> RunCfg:
    """The same settings scoring ``path``: every row sees the same number of its examples."""
    n = cfg.data.max_eval_examples
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_path=path),
                               eval=dataclasses.replace(cfg.eval, max_examples=n))


def _run_icl(cfg: RunCfg, row: dict, transfer: str | None) -> dict:
    from tuneforge.eval.fewshot import evaluate_icl

    k = 0 if row["name"] == "zero-shot" else int(row.get("shots", 4))
    args = dict(k=k, mode=row.get("mode", "chat"), strategy=row.get("strategy", "random"),
                calibrate=bool(row.get("calibrate", False)), seed=cfg.train.seed)
    m = evaluate_icl(cfg, **args)
    out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "trainable_params": 0, "train_seconds": 0.0,
           "infer_ms_per_example": 1000 * m["seconds"] / max(m["n"], 1), "artifact_mb": 0.0}
    if transfer:
        out["transfer_accuracy"] = evaluate_icl(_transfer_cfg(cfg, transfer), **args)["accuracy"]
    return out


def _run_trained(cfg: RunCfg, transfer: str | None) -> dict:
    from tuneforge.eval.run import evaluate_file
    from tuneforge.io.peft_format import CONFIG
    from tuneforge.training.run import run

    result = run(cfg, progress=False)
    after = result.get("after") or {}
    final = Path(cfg.train.output_dir) / "final"
    out = {"accuracy": after.get("accuracy"), "macro_f1": after.get("macro_f1"),
           "trainable_params": result["trainable_parameters"], "train_seconds": result["seconds"],
           "infer_ms_per_example": 1000 * after.get("seconds", 0.0) / max(after.get("n", 1), 1),
           "artifact_mb": result["artifact_bytes"] / 2**20}
    if transfer:
        is_adapter = (final / CONFIG).is_file()  # else a whole model (full fine-tuning)
        target = cfg if is_adapter else dataclasses.replace(cfg, model=str(final))
        m = evaluate_file(_transfer_cfg(target, transfer), transfer, adapter=str(final) if is_adapter else None)
        out["transfer_accuracy"] = m.get("accuracy")
    return out


def run_row(cfg: RunCfg, row: dict, out: Path, transfer: str | None) -> dict:
    """One row, in the current process; returns its columns (an ``error`` column when it fails)."""
    result = {"label": row_label(row), "method": row["name"]}
    try:
        row_cfg = row_config(cfg, row, out)
        if row["name"] in ICL_ROWS:
            result.update(_run_icl(row_cfg, row, transfer))
        else:
            result.update(_run_trained(row_cfg, transfer))
    except UserError as exc:
        result["error"] = exc.line()
    except Exception as exc:  # noqa: BLE001 - a failing method is a row, the rest go on
        result["error"] = f"{type(exc).__name__}: {exc}"
        (out.parent / f"{out.name}.traceback.txt").write_text(traceback.format_exc())
    result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _child(queue, cfg, row, out, transfer):
    from tqdm import tqdm

    # The training loop's bar would take a multiprocessing lock, a semaphore that a process ended by a signal
    # leaves to the resource tracker, which warns of it at exit; a row's bars are its own
    tqdm.set_lock(threading.RLock())
    threading.Thread(target=_exit_on_signal, daemon=True).start()
    queue.put(run_row(cfg, row, out, transfer))


def _exit_on_signal() -> None:
    """In a row's process, which starts with SIGINT and SIGTERM blocked (``_start``): either signal ends it at
    once, with exit code 128 + the signal and no traceback. No handler the row's work installs sees them (the
    training loop's would save a checkpoint, which a comparison never resumes, and say so); compare reports
    the interruption."""
    os._exit(128 + signal.sigwait(STOPS))


def _start(proc) -> None:
    """Start a row's process with SIGINT and SIGTERM blocked: the mask passes through fork and exec, so from its
    first instruction the process leaves them to ``_exit_on_signal``."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop(proc, signum: int) -> None:
    """End a row's process and wait for it: a signal to the process group has reached it already; one to
    compare alone is passed on, and a process still there after 10 s is killed."""
    if proc is None or proc.pid is None:
        return
    if proc.is_alive():
        os.kill(proc.pid, signum)
        proc.join(10)
    if proc.is_alive():
        proc.kill()
    proc.join()


def _again(folder: str = "this one") -> str:
    """How to run a comparison again where its folder holds one already: compare continues none."""
    return f"set compare.output_dir to a new folder (--set compare.output_dir=DIR), or rename {folder}"


def _interrupted(signum: int, results: list[dict], checked: list[dict], out_dir: Path) -> Interrupted:
    """The interruption, reported in one line: the row it stopped, the rows that finished and where their table
    is, and how to run the comparison again."""
    done = len(results)
    if done < len(checked):
        line = f"interrupted in row {done + 1} of {len(checked)} ({checked[done]['label']!r}); "
    else:
        line = f"interrupted after the last of the {len(checked)} rows, before compare.png was drawn; "
    if done:
        line += (f"{out_dir / 'compare.md'} holds the {done} row{'s' if done > 1 else ''} that finished ("
                 + ", ".join(repr(r["label"]) for r in results) + "); ")
    else:
        line += "no row finished, so there is no compare.md; "
    line += f"compare does not continue a comparison: to run it again, {_again(str(out_dir))}"
    print(f"tuneforge: {line}", file=sys.stderr, flush=True)
    stop = Interrupted(signum)
    stop.reported = True
    return stop


def compare(cfg: RunCfg, progress: bool = True, places: Places | None = None) -> list[dict]:
    """Run every row of ``cfg.compare.methods`` (all checked first; ``places`` says where they were written,
    for their errors); write the table and the chart; return the rows' results, a failed row's with its
    ``error``. Ctrl-C (SIGINT) or SIGTERM stops it with one line saying what finished (``Interrupted``,
    reported)."""
    checked = rows(cfg, places)
    out_dir = Path(cfg.compare.output_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError("this compare folder is not empty", str(out_dir), fix=_again())
    write_text(out_dir / "config.yaml", as_compared(cfg, places))
    ctx = multiprocessing.get_context("spawn")  # a fresh process per row: its own peak memory
    results, proc = [], None
    try:
        for i, row in enumerate(checked):
            label = row["label"]
            if progress:
                print(f"tuneforge compare: [{i + 1}/{len(checked)}] {label} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=(queue, cfg, row, out_dir / f"{i:02d}-{_slug(label)}",
                                                    cfg.compare.transfer_path))
            _start(proc)
            proc.join()
            result = queue.get() if not queue.empty() else {"label": label, "method": row["name"],
                                                            "error": f"the process died (exit code {proc.exitcode})"}
            results.append(result)
            if progress:
                shown = (f"accuracy {result['accuracy']:.4f}" if result.get("accuracy") is not None
                         else result.get("error"))
                print(f"tuneforge compare: {label}: {shown} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            write_tables(results, out_dir)  # after every row: a long comparison shows what it has so far
        plot(results, out_dir / "compare.png")
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (the CLI raises Interrupted for it)
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        _stop(proc, signum)
        raise _interrupted(signum, results, checked, out_dir) from None
    return results


def _cell(value, key: str) -> str:
    if value is None:
        return ""
    if key in ("accuracy", "macro_f1", "transfer_accuracy"):
        return f"{value:.4f}"
    if key == "trainable_params":
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.1f}" if key != "artifact_mb" else f"{value:.2f}"
    return str(value)


def write_tables(results: list[dict], out_dir: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results)
    write_text(out_dir / "compare.csv", buf.getvalue())
    head = "| " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(k), k).replace("|", "/") for k in COLUMNS) + " |" for r in results]
    write_text(out_dir / "compare.md", "\n".join(lines) + "\n")


def plot(results: list[dict], png: Path) -> None:
    """Accuracy against trainable parameters (log scale); methods that train nothing sit at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.get("accuracy") is None:
            continue
        x = max(r.get("trainable_params") or 0, 1)
        ax.scatter(x, r["accuracy"], s=30)
        ax.annotate(r["label"], (x, r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; in-context methods at 1)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
