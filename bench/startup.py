"""Start-up: how long `tuneforge generate --max-new-tokens 1` takes from the shell, and where it goes.

Cold: a new cache folder (``TUNEFORGE_CACHE``), so the named model's GGUF file is converted to
safetensors first, as on a machine's first run. Warm: the cache filled, the median of a few runs. Then
one process times the stages of a warm start in order: the imports, the tokenizer, the model, the
first token.

    python bench/startup.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMAND = ["-m", "tuneforge", "generate", "--model", "smollm2-135m", "--prompt", "Hi", "--max-new-tokens", "1"]


def child() -> dict:
    """The stages of a warm start, timed in this process."""
    marks = [("start", time.perf_counter())]
    from tuneforge import cli  # noqa: F401  (the command line's own imports)
    from tuneforge.eval.generate import generate
    from tuneforge.io.load import load_model, load_tokenizer, resolve_spec
    marks.append(("imports", time.perf_counter()))
    path = resolve_spec("smollm2-135m")
    load_tokenizer(path)
    marks.append(("tokenizer", time.perf_counter()))
    model, tokenizer = load_model("smollm2-135m")
    marks.append(("model (tokenizer again inside)", time.perf_counter()))
    generate(model, tokenizer, "Hi", max_new_tokens=1)
    marks.append(("first token", time.perf_counter()))
    return {name: b - a for (_, a), (name, b) in zip(marks, marks[1:])}


def timed(env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *COMMAND], cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warm", type=int, default=5, help="warm runs")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child()))
        return

    from bench.report import machine, spawn, write_section

    with tempfile.TemporaryDirectory() as cache:
        cold = timed({**os.environ, "TUNEFORGE_CACHE": cache})
    warm = [timed(dict(os.environ)) for _ in range(args.warm)]
    stages = spawn(__file__, ["--child"], REPO)
    print(f"cold {cold:.1f} s, warm {statistics.median(warm):.1f} s (runs: {', '.join(f'{w:.1f}' for w in warm)})")
    print(stages)
    rows = "\n".join(f"| {name} | {seconds:.2f} |" for name, seconds in stages.items())
    write_section("startup", f"""
## Start-up: `tuneforge generate --model smollm2-135m --prompt Hi --max-new-tokens 1`

`python bench/startup.py` on {machine()}: wall time from the shell. Cold, with an empty cache (the GGUF
file converted to safetensors first): {cold:.1f} s. Warm, the cache filled: {statistics.median(warm):.1f} s,
the median of {args.warm} runs ({', '.join(f'{w:.1f}' for w in warm)}). Where a warm start goes, stage by
stage in one process:

| stage | seconds |
|---|---|
{rows}
""")


if __name__ == "__main__":
    main()
