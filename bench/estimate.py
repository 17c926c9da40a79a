"""tuneforge's estimate against what the runs measured: peak memory and step time, method by method.

Reads what ``bench/methods.py`` recorded (each tuneforge run computed its own estimate before it
trained, from its data's batches, and the units of each part of a step's work): the latest run,
``bench/results/methods.json``, and the runs kept beside it from other hosts (``methods-DATE.json``, a
copy of that file). The step time is recomputed from those units with the costs in
``tuneforge/training/estimate.py`` (``TIME_COST``); ``--fit`` fits those costs on every kept run at once
(least squares on the relative error, no cost below zero and the matmuls' at least 1: no step beats the
measured rate) and prints them, to be written there. Hosts differ in more than their matmul rate: costs
fitted on one host's runs alone misjudge another's steps by up to a third, where costs fitted on both
hold for both.

    python bench/methods.py && python bench/estimate.py --fit && python bench/estimate.py
    cp bench/results/methods.json bench/results/methods-$(date +%F).json   # keep a host's run for the fit
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


RESULTS = REPO / "bench" / "results"


@functools.cache
def hosts() -> dict[str, dict]:
    """The kept runs of ``bench/methods.py`` by file name, the latest (methods.json) first."""
    files = sorted(RESULTS.glob("methods*.json"), key=lambda f: (f.name != "methods.json", f.name))
    return {f.name: json.loads(f.read_text()) for f in files}


def runs(only: str | None = None, leave_out: str | None = None) -> list[tuple[str, str, str, dict]]:
    """(file, workload, row, result) of each tuneforge run that trained and recorded its estimate's work."""
    return [(name, *key.split("|")[:2], r) for name, results in hosts().items() for key, r in results.items()
            if key.endswith("|tuneforge") and "error" not in r and "work" in r["estimate"]
            and name != leave_out and only in (None, name)]


def predicted(work: dict, cost: dict) -> float:
    return sum(cost.get(part, 0.0) * units for part, units in work.items() if part != "rate") / work["rate"]


def fit(chosen: list[tuple[str, str, str, dict]] | None = None) -> dict[str, float]:
    """Costs that make the estimates' relative errors smallest in the least-squares sense, none negative,
    and the matmuls' at least 1 (no step runs its matmuls faster than the measured rate): the matmul cost
    is 1 + d with d >= 0, so the solver sees 1 - (matmul units at cost 1) as what the rest must explain."""
    import numpy as np
    from scipy.optimize import nnls

    from tuneforge.training.estimate import TIME_COST

    parts = list(TIME_COST["cpu"])
    rows = [[r["estimate"]["work"].get(p, 0.0) / (r["estimate"]["work"]["rate"] * r["step_seconds"]) for p in parts]
            for *_, r in (runs() if chosen is None else chosen)]
    matrix = np.array(rows)
    target = 1 - matrix[:, parts.index("matmul")]
    scale = matrix.max(0) + 1e-30  # columns of comparable size, for the solver
    solution, _ = nnls(matrix / scale, target)
    cost = solution / scale
    cost[parts.index("matmul")] += 1
    return {p: float(f"{c:.4g}") for p, c in zip(parts, cost)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit", action="store_true", help="print TIME_COST['cpu'] fitted on the runs")
    args = parser.parse_args()
    if args.fit:
        print("TIME_COST['cpu'] =", fit())
        return

    from bench.methods import SHORT
    from bench.report import write_section
    from tuneforge.training.estimate import TIME_COST

    kept = hosts()
    label = {name: f"{h['host']['date']}, {h['host']['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s" for name, h in kept.items()}
    lines = ["| host | workload | method | peak RSS, estimated (MB) | measured (MB) | error | s/step, estimated "
             "| measured | error |", "|---|---|---|---|---|---|---|---|---|"]
    worst = {"memory": 0.0, "time": 0.0}
    for name, workload, row, r in runs():
        est = r["estimate"]
        seconds = predicted(est["work"], TIME_COST["cpu"])
        mem = est["peak_mb"] / r["peak_rss_mb"] - 1
        step = seconds / r["step_seconds"] - 1
        worst = {"memory": max(worst["memory"], abs(mem)), "time": max(worst["time"], abs(step))}
        lines.append(f"| {label[name]} | {workload} | {SHORT[row]} | {est['peak_mb']:.0f} | {r['peak_rss_mb']:.0f} "
                     f"| {mem:+.0%} | {seconds:.2f} | {r['step_seconds']:.2f} | {step:+.0%} |")
    table = "\n".join(lines)
    print(table)

    def error(run, cost) -> float:
        return abs(predicted(run[-1]["estimate"]["work"], cost) / run[-1]["step_seconds"] - 1)

    every = runs()
    unseen = max(error(run, fit(every[:i] + every[i + 1:])) for i, run in enumerate(every))
    other_host = {name: max(error(run, fit(runs(leave_out=name))) for run in runs(only=name))
                  for name in kept if len(kept) > 1}
    hosts_line = "; ".join(f"{kept[name]['host']['machine']} on {label[name]}" for name in kept)
    across = "".join(f" The steps of the host of {label[name]}, predicted by costs fitted without its runs: the "
                     f"largest error is {e:.0%}." for name, e in other_host.items())
    costs = ", ".join(f"{part} {cost:.3g}" for part, cost in TIME_COST["cpu"].items())
    write_section("estimate", f"""
`python bench/estimate.py`, from the runs of `python bench/methods.py` kept in `bench/results/` ({hosts_line}):
each run's estimate, computed before it trained from its own data's batches, against its peak RSS and
its median step time. The step time is the run's units of work at the costs in `TIME_COST` ({costs}
flops of matmul time per unit), which `python bench/estimate.py --fit` fitted on all these runs at once.
The largest errors: memory {worst['memory']:.0%}, step time {worst['time']:.0%}. Each run's step time
predicted by costs fitted on the other runs alone: the largest error is {unseen:.0%}.{across}

{table}
""", path=REPO / "docs" / "estimate.md")


if __name__ == "__main__":
    main()
