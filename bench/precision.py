"""LoRA's step in fp32 and under bf16 autocast on the CPU, both sides in one process: what a CPU with
bf16 matrix units (AMX) gives, and what it leaves to the work around the matmuls.

The CPU's fp32 and bf16 matmul rates are measured first (2048 x 2048, the median of five). Then four
models take one optimizer step each per round on one batch, in an order that rotates from round to
round: tuneforge and Transformers + PEFT (LoRA r=16 alpha=32 on all linear layers, dropout 0), each in
fp32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``, as ``train.precision: bf16`` runs a
step (``training/precision.py``). A step is forward, backward, AdamW's update and zeroing the
gradients; each side's loss as in ``bench/paired.py``. Both sides must lower the batch's loss over the
rounds and move their adapters (checked, printed). Each ratio is the median over rounds of the ratio
within a round.

    python bench/precision.py                      # packed text, 4 x 256; writes BENCHMARKS.md
    python bench/precision.py --workload sentiment
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.methods import ROWS, run_config  # noqa: E402  (the repository on the path first)
from bench.paired import stepper  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def matmul_rate(dtype, size: int = 2048, rounds: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    timings = []
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        timings.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds, after one to warm up")
    parser.add_argument("--workload", choices=["text", "sentiment"], default="text")
    args = parser.parse_args()

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from bench.report import machine, write_section
    from tuneforge.data import Collator, load_datasets
    from tuneforge.eval.lm import label_loss
    from tuneforge.io.load import load_model, resolve_spec
    from tuneforge.methods.registry import get_method
    from tuneforge.training.prepare import prepare
    from tuneforge.training.run import batch_order

    rates = {p: matmul_rate(torch.float32 if p == "fp32" else torch.bfloat16) for p in PRECISIONS}
    print(", ".join(f"{p} matmul {r / 1e9:.0f} GFLOP/s" for p, r in rates.items()), flush=True)

    def under(precision: str, loss_of):
        def loss(model):
            with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
                return loss_of(model)
        return loss

    def mean_label_loss(model):  # as a run computes it
        total, n = label_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return total / n

    method, keys, _ = ROWS["LoRA, dropout 0"]
    cfg = run_config(method, keys, args.workload, 1)
    steps, moved, batch = {}, {}, None
    for precision in PRECISIONS:
        model, tokenizer = load_model(cfg.model, dtype="float32", device="cpu")
        if batch is None:
            data = load_datasets(cfg.data, tokenizer, seed=0)
            batch = Collator(tokenizer.pad_token_id)([data.train[i] for i in batch_order(cfg, data)(0)[0]])
        _, params = prepare(model, get_method(method), cfg)
        steps["tuneforge", precision] = stepper(model, params, cfg.train.learning_rate,
                                                under(precision, mean_label_loss))
        ref = AutoModelForCausalLM.from_pretrained(resolve_spec(cfg.model), dtype=torch.float32)
        ref = peft.get_peft_model(ref, peft.LoraConfig(task_type="CAUSAL_LM", r=keys["r"], lora_alpha=keys["lora_alpha"],
                                                       lora_dropout=0.0, target_modules="all-linear"))
        ref_params = {n: q for n, q in ref.named_parameters() if q.requires_grad}
        steps["reference", precision] = stepper(ref, ref_params, cfg.train.learning_rate,
                                                under(precision, lambda m: m(**batch).loss))
        for side, ps in (("tuneforge", params), ("reference", ref_params)):
            before = {n: q.detach().clone() for n, q in ps.items()}
            moved[side, precision] = lambda ps=ps, before=before: any(not torch.equal(q, before[n])
                                                                      for n, q in ps.items())

    keys_ = list(steps)
    seconds = {key: [] for key in steps}
    losses = {key: [] for key in steps}
    for round_ in range(args.rounds + 1):
        order = keys_[round_ % len(keys_):] + keys_[:round_ % len(keys_)]
        for key in order:
            start = time.perf_counter()
            loss = steps[key]()
            if round_:
                seconds[key].append(time.perf_counter() - start)
            losses[key].append(loss)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{s} {p} {seconds[s, p][-1]:.2f} s" for s, p in keys_), flush=True)

    def median_ratio(a, b) -> float:  # the median over rounds of a's time over b's, within each round
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))

    works = {key: losses[key][-1] < losses[key][0] and moved[key]() for key in steps}
    lines = []
    for precision in PRECISIONS:
        t, r = ("tuneforge", precision), ("reference", precision)
        lines.append(f"| {precision} | {statistics.median(seconds[t]):.2f} | {statistics.median(seconds[r]):.2f} "
                     f"| {median_ratio(r, t):.2f}x | {'yes' if works[t] and works[r] else 'NO'}: "
                     f"{losses[t][0]:.3f} -> {losses[t][-1]:.3f} / {losses[r][0]:.3f} -> {losses[r][-1]:.3f} |")
    gain = {side: median_ratio((side, "fp32"), (side, "bf16")) for side in ("tuneforge", "reference")}
    for line in lines:
        print(line)
    print(f"bf16 over fp32: tuneforge {gain['tuneforge']:.2f}x, the reference {gain['reference']:.2f}x")
    text = args.workload == "text"
    what = ("one 4 x 256 batch of packed tinyshakespeare" if text else
            f"the sentiment task's first batch ({batch['input_ids'].shape[0]} prompts of up to "
            f"{batch['input_ids'].shape[1]} tokens, loss on the answer)")
    write_section("precision" if text else "precision-sentiment", f"""
## LoRA's step in fp32 and under bf16 autocast on the CPU, {"packed text" if text else "the sentiment task"}

`python bench/precision.py --rounds {args.rounds}{"" if text else " --workload sentiment"}` on {machine()}: matmul at
2048 x 2048, {rates['fp32'] / 1e9:.0f} GFLOP/s in fp32 and {rates['bf16'] / 1e9:.0f} GFLOP/s in bf16
({rates['bf16'] / rates['fp32']:.1f}x). LoRA r=16 alpha=32 on all linear layers, dropout 0, {what}; the four
models take one optimizer step each per round, in an order that rotates from round to round,
{args.rounds} timed rounds after one to warm up; bf16 is `torch.autocast("cpu", dtype=torch.bfloat16)`
around the forward, as `train.precision: bf16` runs it, the weights and the optimizer in fp32. Times
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
