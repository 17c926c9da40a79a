"""LoRA's step in fp32 and under bf16 autocast on the CPU, both sides in one process: what a CPU with
bf16 matrix units (AMX) gives, and what it leaves to the work around the matmuls.

The CPU's fp32 and bf16 matmul rates are measured first (2048 x 2048, the median of five). Then four
models take one optimizer step each per round on one batch, in an order that rotates from round to
round: tuneforge and Transformers + PEFT (LoRA r=16 alpha=32 on all linear layers, dropout 0), each in
fp32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``, as ``train.precision: bf16`` runs a
step (``training/precision.py``; tuneforge's frozen linear layers held in bf16, as a run holds them). A
step is forward, backward, AdamW's update and zeroing the gradients; each side's loss as in
``bench/paired.py``. Both sides must lower the batch's loss over the rounds and move their adapters
(checked, printed). Each ratio is the median over rounds of the ratio within a round.

    python bench/precision.py                      # packed text, 4 x 256; writes BENCHMARKS.md
    python bench/precision.py --workload sentiment
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.paired import lora_sides, median_ratio, table_row, take_turns, the_batch  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds, after one to warm up")
    parser.add_argument("--workload", choices=["text", "sentiment"], default="text")
    args = parser.parse_args()

    import torch

    from bench.report import machine, write_section
    from tuneforge.model.devices import DTYPES
    from tuneforge.training.estimate import matmul_flops_per_s

    rates = {p: matmul_flops_per_s(torch.device("cpu"), size=2048, dtype=DTYPES[p])
             for p in PRECISIONS}
    print(", ".join(f"{p} matmul {r / 1e9:.0f} GFLOP/s" for p, r in rates.items()), flush=True)
    steps, moved, batch = lora_sides(args.workload, {p: (0.0, p) for p in PRECISIONS})
    seconds, losses, works = take_turns(steps, moved, args.rounds)
    lines = [table_row(precision, precision, seconds, losses, works) for precision in PRECISIONS]
    gain = {side: median_ratio(seconds, (side, "fp32"), (side, "bf16")) for side in ("tuneforge", "reference")}
    for line in lines:
        print(line)
    print(f"bf16 over fp32: tuneforge {gain['tuneforge']:.2f}x, the reference {gain['reference']:.2f}x")
    text = args.workload == "text"
    what = the_batch(args.workload, batch)
    write_section("precision" if text else "precision-sentiment", f"""
## LoRA's step in fp32 and under bf16 autocast on the CPU, {"packed text" if text else "the sentiment task"}

`python bench/precision.py --rounds {args.rounds}{"" if text else " --workload sentiment"}` on {machine()}: matmul at
2048 x 2048, {rates['fp32'] / 1e9:.0f} GFLOP/s in fp32 and {rates['bf16'] / 1e9:.0f} GFLOP/s in bf16
({rates['bf16'] / rates['fp32']:.1f}x). LoRA r=16 alpha=32 on all linear layers, dropout 0, {what}; the four
models take one optimizer step each per round, in an order that rotates from round to round,
{args.rounds} timed rounds after one to warm up; bf16 is `torch.autocast("cpu", dtype=torch.bfloat16)`
around the forward, as `train.precision: bf16` runs it, the adapter and the optimizer in fp32; tuneforge's
frozen linear layers are held in bf16, as a run holds them (autocast would cast them to bf16 at each forward:
the same numbers), the reference's in fp32. Times
are medians; the speed is the median over rounds of the reference's step time over tuneforge's in the
same round. "works": over the rounds the batch's loss fell and the adapter moved, on both sides.

| precision | tuneforge s/step | reference s/step | speed | works |
|---|---|---|---|---|
{chr(10).join(lines)}

bf16 over fp32, the median over rounds of the ratio within a round: tuneforge {gain['tuneforge']:.2f}x,
the reference {gain['reference']:.2f}x. `train.precision: auto` stays fp32 on the CPU: bf16 changes
the numbers a step computes, and on a CPU without bf16 matrix units it is slower than fp32.
""")


if __name__ == "__main__":
    main()
