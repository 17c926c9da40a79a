"""tuneforge's estimate against what the runs measured: peak memory and step time, method by method.

Reads what ``bench/methods.py`` recorded (each tuneforge run computed its own estimate before it
trained, from its data's batches) and writes the table into docs/estimate.md.

    python bench/methods.py && python bench/estimate.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from bench.methods import SHORT
    from bench.report import write_section

    results = json.loads((REPO / "bench" / "results" / "methods.json").read_text())
    lines = ["| workload | method | peak RSS, estimated (MB) | measured (MB) | error | s/step, estimated | measured "
             "| error |", "|---|---|---|---|---|---|---|---|"]
    worst = {"memory": 0.0, "time": 0.0}
    for key, r in results.items():
        workload, row, side = key.split("|")
        if side != "tuneforge" or "error" in r:
            continue
        est = r["estimate"]
        mem = est["peak_mb"] / r["peak_rss_mb"] - 1
        step = est["step_seconds"] / r["step_seconds"] - 1
        worst = {"memory": max(worst["memory"], abs(mem)), "time": max(worst["time"], abs(step))}
        lines.append(f"| {workload} | {SHORT[row]} | {est['peak_mb']:.0f} | {r['peak_rss_mb']:.0f} | {mem:+.0%} | "
                     f"{est['step_seconds']:.2f} | {r['step_seconds']:.2f} | {step:+.0%} |")
    table = "\n".join(lines)
    print(table)
    write_section("estimate", f"""
`python bench/estimate.py`, from the runs of `python bench/methods.py`: each run's estimate, computed
before it trained from its own data's batches, against its peak RSS and its median step time. The
largest errors: memory {worst['memory']:.0%}, step time {worst['time']:.0%}.

{table}
""", path=REPO / "docs" / "estimate.md")


if __name__ == "__main__":
    main()
