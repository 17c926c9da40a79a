"""This tree's tuneforge against an earlier commit's, side by side: did a change make the default
model's steps slower or heavier?

Each row of bench/methods.py runs in its own process in this tree and in a git worktree of REF
(bench/methods.py's own child), the two alternating, `--repeats` times each; a row reports the
medians and the ratios, and that both sides' loss fell and weights moved.

    python bench/versus.py --ref 734b026 --rows lora,lora0 --workloads text,sentiment
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(tree: Path, row: str, workload: str, steps: int) -> dict:
    proc = subprocess.run([sys.executable, str(tree / "bench" / "methods.py"), "--child", "tuneforge", row, workload,
                           "--steps", str(steps)], capture_output=True, text=True, cwd=tree)
    line = [out for out in proc.stdout.splitlines() if out.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{tree}: {row} {workload}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(line[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", required=True, help="the earlier commit")
    parser.add_argument("--rows", default="lora,lora0", help="rows of bench/methods.py (its short names)")
    parser.add_argument("--workloads", default="text,sentiment")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from bench.report import machine, write_section

    lines = [f"## This tree against {args.ref}\n\n`python bench/versus.py --ref {args.ref} --rows {args.rows} "
             f"--workloads {args.workloads} --repeats {args.repeats}` on {machine()}: tuneforge's step on the default "
             f"model, each run in its own process, the two trees alternating; medians over the runs' medians.\n",
             "| workload | row | this tree s/step | ref s/step | time ratio | this tree peak RSS (MB) | ref (MB) | "
             "loss fell | weights moved |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        ref_tree = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", str(ref_tree), args.ref], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for workload in args.workloads.split(","):
                steps = {"text": 6, "sentiment": 10}[workload]
                for row in args.rows.split(","):
                    runs = {"this": [], "ref": []}
                    for _ in range(args.repeats):
                        for side, tree in (("this", REPO), ("ref", ref_tree)):
                            runs[side].append(child(tree, row, workload, steps))
                    s = {k: statistics.median(r["step_seconds"] for r in v) for k, v in runs.items()}
                    m = {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
                    fell = all(r["last_loss"] < r["first_loss"] for v in runs.values() for r in v)
                    moved = all(r["moved"] > 0 for v in runs.values() for r in v)
                    line = (f"| {workload} | {row} | {s['this']:.2f} | {s['ref']:.2f} | {s['this'] / s['ref']:.2f}x | "
                            f"{m['this']:.0f} | {m['ref']:.0f} | {'yes' if fell else 'NO'} | {'yes' if moved else 'NO'} |")
                    print(line, flush=True)
                    lines.append(line)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=REPO, capture_output=True)
    lines.append("\n\"loss fell\" and \"weights moved\": on every run of both trees, the last step's batch loss was "
                 "below the first's, and the trained weights changed. On packed text the last step's batch is another "
                 "text than the first's, so its loss need not be lower after six steps (a fixed-batch check is still to "
                 "be made). A time ratio below 1 means this tree is faster.")
    write_section("versus", "\n".join(lines))


if __name__ == "__main__":
    main()
