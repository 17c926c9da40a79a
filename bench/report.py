"""Each benchmark owns one section of BENCHMARKS.md, between markers, and rewrites only that."""

from __future__ import annotations

import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tuneforge.core.atomic import write_text

PATH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nWritten by the scripts under `bench/`; each section says the command that "
          "produced it. tuneforge and the reference run side by side in one invocation, so ratios compare "
          "like with like on the same machine and load.\n")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu()}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


# The vector units that set a CPU's matmul rate, by their /proc/cpuinfo flags: hosts of one cloud type differ
# in them (two hosts here multiplied fp32 at about 170 and, with AVX-512, about 340 GFLOP/s), and with them
# every ratio between matmul work and the rest.
VECTOR_UNITS = (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu() -> str:
    """The CPU's model name and its widest vector units (Linux), else the platform's name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    units = [label for flag, label in VECTOR_UNITS if flags and flag in flags.group(1).split()]
    units = [u for u in units if u != "AVX2" or len(units) == 1]  # AVX2 only where it is the widest
    return (name.group(1).strip() if name else platform.machine()) + (f" ({', '.join(units)})" if units else "")


def rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_seconds(times: list[float], start: float) -> float:
    """The median optimizer step from the moments each ended; the first step, which warms up, left out."""
    return statistics.median([b - a for a, b in zip([start] + times[:-1], times)][1:])


def trainer_timer(times: list[float], losses: list[float]):
    """A transformers TrainerCallback that appends each step's end to ``times`` and each logged loss to
    ``losses``: the reference side's clock."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    return Timer()


def cpu_ticks() -> tuple[int, int] | None:
    """(stolen, all) CPU ticks since boot from Linux's /proc/stat, or None elsewhere. Stolen ticks are
    those a virtual machine's host gave to other guests while this one had work to run: a step timed
    through them is slower for reasons of the host's, not of the code."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def spawn(script: str, args: list[str], cwd: Path) -> dict:
    """``script ARGS`` in a process of its own (its peak RSS its own): the JSON after its "RESULT " line,
    or {"error": its last line of stderr}. Where the machine reports it, "stolen" is the share of the CPU
    time the host took while it ran (``cpu_ticks``)."""
    before = cpu_ticks()
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=cwd)
    after = cpu_ticks()
    line = [out for out in proc.stdout.splitlines() if out.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    result = json.loads(line[0][len("RESULT "):])
    if before and after and after[1] > before[1]:
        result["stolen"] = (after[0] - before[0]) / (after[1] - before[1])
    return result


def write_section(name: str, body: str, path: Path = PATH) -> None:
    """Replace section ``name`` of ``path`` (BENCHMARKS.md unless another document holds it)."""
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- bench:{name} -->\n{body.strip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text(path, text)
