"""Each benchmark owns one section of BENCHMARKS.md, between markers, and rewrites only that."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

from tuneforge.core.atomic import write_text

PATH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nWritten by the scripts under `bench/`; each section says the command that "
          "produced it. tuneforge and the reference run side by side in one invocation, so ratios compare "
          "like with like on the same machine and load.\n")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def write_section(name: str, body: str, path: Path = PATH) -> None:
    """Replace section ``name`` of ``path`` (BENCHMARKS.md unless another document holds it)."""
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- bench:{name} -->\n{body.strip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text(path, text)
