"""LoRA's step, both sides in one process, step by step in turn: the speed ratios and dropout's cost
with the machine's drift shared.

``bench/methods.py`` runs each configuration in a process of its own, minutes apart; on a machine whose
speed drifts by tens of percent from one minute to the next, a ratio of two such runs carries that
drift. Here the four models (tuneforge and Transformers + PEFT, LoRA r=16 alpha=32 on all linear
layers, dropout 0.05 and 0) live in one process and take one optimizer step each in every round, on
the same batch: on packed text, 4 x 256 tokens of tinyshakespeare (``bench/methods.py``'s first text
batch); on the sentiment task, the LoRA recipe's first batch of 8 prompts (a shared prefix). Each
ratio is the median over rounds of the ratio within a round. A step is forward, backward, AdamW's
update and zeroing the gradients: tuneforge's as a run prepares the model and computes the loss
(``training/prepare.py``, ``eval/lm.py``), the reference's loss from the model's own forward. Both
sides must lower the batch's loss over the rounds and move their adapters (checked, printed). The models
take their turns in an order that rotates from round to round. After the timed rounds, each model takes one
more step under torch's profiler: where its step goes, in matmul kernels (and the rate they reach on the
step's shapes, counted from the shapes the profiler records), in attention kernels and in everything else.

    python bench/paired.py                          # packed text, 8 rounds; writes BENCHMARKS.md
    python bench/paired.py --workload sentiment
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.methods import ROWS, run_config  # noqa: E402  (the repository on the path first)

DROPOUT = {"lora": 0.05, "lora0": 0.0}  # the rows, by bench/methods.py's short names
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv",
           "aten::addmv_"}  # the kernels whose self time is matmul work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds, after one to warm up")
    parser.add_argument("--workload", choices=["text", "sentiment"], default="text")
    args = parser.parse_args()

    from bench.report import machine, write_section

    steps, moved, batch = lora_sides(args.workload, {row: (p, None) for row, p in DROPOUT.items()})
    seconds, losses, works = take_turns(steps, moved, args.rounds)
    lines = [table_row(f"LoRA, dropout {p:g}", row, seconds, losses, works) for row, p in DROPOUT.items()]
    cost = {side: median_ratio(seconds, (side, "lora"), (side, "lora0")) - 1 for side in ("tuneforge", "reference")}
    for line in lines:
        print(line)
    print(f"dropout 0.05 costs tuneforge {cost['tuneforge']:+.1%}, the reference {cost['reference']:+.1%}")
    text = args.workload == "text"
    where = where_steps_go(steps, seconds, args.workload)
    print(where)
    what = the_batch(args.workload, batch) + ("" if text else "; tuneforge runs their shared prefix once")
    write_section("paired" if text else "paired-sentiment", f"""
## LoRA on {"packed text" if text else "the sentiment task"}, both sides in one process

`python bench/paired.py --rounds {args.rounds}{"" if text else " --workload sentiment"}` on {machine()}: LoRA r=16
alpha=32 on all linear layers, {what}; the four models take one optimizer step each per round (forward,
backward, AdamW, gradients zeroed), in an order that rotates from round to round, {args.rounds} timed rounds
after one to warm up. Times are medians; the speed is
the median over rounds of the reference's step time over tuneforge's in the same round, so the machine's
drift falls on both. "works": over the rounds the batch's loss fell and the adapter moved, on both sides
(first -> last loss, tuneforge / reference).

| row | tuneforge s/step | reference s/step | speed | works |
|---|---|---|---|---|
{chr(10).join(lines)}

Dropout 0.05 over dropout 0, the median over rounds of the ratio within a round: tuneforge
{cost['tuneforge']:+.1%}, the reference {cost['reference']:+.1%}.
{where}""")


def where_steps_go(steps: dict, seconds: dict, workload: str) -> str:
    """One more step of each model under torch's profiler, after the timed rounds: the seconds of its median
    timed step spent in matmul kernels, in attention kernels and in the rest, with the rate the matmul
    kernels reach on the step's own shapes, against the 1024 x 1024 fp32 rate measured just before; and
    the matmul share as ``bench/methods.py`` defines it (the estimate's floating-point work over the step's
    time and that rate), with the share a step of nothing but its matmul and attention kernels would have."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tuneforge.training.estimate import matmul_flops_per_s

    flops = step_flops(workload)
    rate = matmul_flops_per_s(torch.device("cpu"))
    lines = ["| row | side | step s | matmul kernels s | their rate, GFLOP/s | attention kernels s | the rest s "
             "| matmul share | with matmul and attention kernels alone |", "|---|---|---|---|---|---|---|---|---|"]
    for side, row in steps:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            steps[side, row]()
        matmul = work = attention = 0.0
        for event in prof.events():
            if event.name in MATMULS:
                matmul += event.self_cpu_time_total / 1e6
                work += matmul_work(event.name, event.input_shapes)
            elif "scaled_dot_product" in event.name or "flash_attention" in event.name:
                attention += event.self_cpu_time_total / 1e6
        step = statistics.median(seconds[side, row])
        lines.append(f"| dropout {DROPOUT[row]:g} | {side} | {step:.2f} | {matmul:.2f} ({matmul / step:.0%}) | "
                     f"{work / matmul / 1e9:.0f} ({work / matmul / rate:.0%}) | {attention:.2f} "
                     f"({attention / step:.0%}) | {step - matmul - attention:.2f} "
                     f"({(step - matmul - attention) / step:.0%}) | {flops / step / rate:.0%} | "
                     f"{flops / (matmul + attention) / rate:.0%} |")
    return f"""
Where each step goes: one more step of each model under torch's profiler after the timed rounds, its
kernels' own time set against the median timed step; the 1024 x 1024 fp32 matmul rate measured just
before: {rate / 1e9:.0f} GFLOP/s. The matmul kernels' rate is their floating-point work, counted from the
shapes the profiler records, over their time. The matmul share is `bench/methods.py`'s: the floating-point
work of tuneforge's step as its estimate counts it ({flops / 1e9:.0f} GFLOP) over the step's time and the
1024 x 1024 rate; the last column is the share the step would have if it ran its matmul and attention kernels
and nothing else.

{chr(10).join(lines)}
"""


def matmul_work(name: str, shapes: list) -> float:
    """The floating-point work of one matmul kernel from its operands' shapes, as the profiler records them:
    the first two (an ``add`` kernel's second and third, after the tensor it adds to) are the matrices, the
    matrix and the vector, or the batched matrices; an ``out=`` tensor or the scalars come after them."""
    import math

    first = 1 if name.startswith(("aten::add", "aten::baddbmm")) else 0
    a, b = shapes[first], shapes[first + 1]
    if len(b) == 1:  # a matrix-vector product
        return 2.0 * math.prod(a)
    return 2.0 * math.prod(a) * b[-1]


def step_flops(workload: str) -> float:
    """The floating-point work of a LoRA step on the workload's batches, as tuneforge's estimate counts it."""
    from tuneforge.data import load_datasets
    from tuneforge.io.load import load_tokenizer
    from tuneforge.training.run import run_estimate

    method, keys, _ = ROWS["LoRA, dropout 0"]
    cfg = run_config(method, keys, workload, 1)
    tokenizer = load_tokenizer(cfg.model)
    return run_estimate(cfg, load_datasets(cfg.data, tokenizer, seed=0), tokenizer).flops_per_step


def lora_sides(workload: str, rows: dict) -> tuple[dict, dict, dict]:
    """tuneforge's and Transformers + PEFT's LoRA (r=16, alpha=32, all linear layers) on the default model,
    for each row of ``rows`` (its name: (its dropout, the precision its forward runs in: a
    ``training/precision.py`` name, None for fp32)), each as a function taking one optimizer step on the
    workload's first batch (as ``bench/methods.py`` takes it) and returning the loss before it: tuneforge's
    loss as a run computes it (``training/prepare.py``, ``eval/lm.py``), the reference's from the model's own
    forward. Returns ({(side, row): step}, {(side, row): whether its adapter moved}, the batch)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.data import Collator, load_datasets
    from tuneforge.eval.lm import label_loss
    from tuneforge.io.load import load_model, resolve_spec
    from tuneforge.methods.registry import get_method
    from tuneforge.training.precision import Precision, hold_frozen_linears
    from tuneforge.training.prepare import prepare
    from tuneforge.training.run import batch_order

    def mean_label_loss(model):  # as a run computes it
        total, n = label_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return total / n

    def reference_loss(model):
        return model(**batch).loss

    steps, moved, batch = {}, {}, None
    for row, (dropout, precision) in rows.items():
        method, keys, _ = ROWS["LoRA, dropout 0.05" if dropout else "LoRA, dropout 0"]
        cfg = run_config(method, keys, workload, 1)
        model, tokenizer = load_model(cfg.model, dtype="float32", device="cpu")
        if batch is None:
            data = load_datasets(cfg.data, tokenizer, seed=0)
            batch = Collator(tokenizer.pad_token_id)([data.train[i] for i in batch_order(cfg, data)(0)[0]])
        _, params = prepare(model, get_method(method), cfg)
        hold_frozen_linears(model, precision or "fp32", torch.device("cpu"))  # as a run holds them
        ref = AutoModelForCausalLM.from_pretrained(resolve_spec(cfg.model), dtype=torch.float32)
        ref = peft.get_peft_model(ref, peft.LoraConfig(task_type="CAUSAL_LM", r=keys["r"], lora_alpha=keys["lora_alpha"],
                                                       lora_dropout=dropout, target_modules="all-linear"))
        ref_params = {n: q for n, q in ref.named_parameters() if q.requires_grad}
        autocast = Precision(precision or "fp32", torch.device("cpu")).autocast
        for side, m, ps, loss_of in (("tuneforge", model, params, mean_label_loss),
                                     ("reference", ref, ref_params, reference_loss)):
            steps[side, row] = stepper(m, ps, cfg.train.learning_rate, loss_of, autocast)
            before = {n: q.detach().clone() for n, q in ps.items()}
            moved[side, row] = lambda ps=ps, before=before: any(not torch.equal(q, before[n]) for n, q in ps.items())
    return steps, moved, batch


def the_batch(workload: str, batch: dict) -> str:
    """The batch, in words."""
    if workload == "text":
        return "one 4 x 256 batch of packed tinyshakespeare"
    return (f"the sentiment task's first batch ({batch['input_ids'].shape[0]} prompts of up to "
            f"{batch['input_ids'].shape[1]} tokens, loss on the answer)")


def take_turns(steps: dict, moved: dict, rounds: int) -> tuple[dict, dict, dict]:
    """One step of each of ``steps`` per round, in an order that rotates from round to round (a drift of the
    machine's speed within a round falls on each alike), ``rounds`` timed after one to warm up: (the timed
    steps' seconds, every step's loss, whether the loss fell and the adapter moved (``moved``)), by key."""
    keys = list(steps)
    seconds = {key: [] for key in keys}
    losses = {key: [] for key in keys}
    for round_ in range(rounds + 1):
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            start = time.perf_counter()
            loss = steps[key]()
            if round_:
                seconds[key].append(time.perf_counter() - start)
            losses[key].append(loss)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{' '.join(key)} {seconds[key][-1]:.2f} s" for key in keys),
                  flush=True)
    return seconds, losses, {key: losses[key][-1] < losses[key][0] and moved[key]() for key in keys}


def median_ratio(seconds: dict, a, b) -> float:
    """The median over rounds of a's time over b's, within each round."""
    return statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))


def table_row(label: str, row: str, seconds: dict, losses: dict, works: dict) -> str:
    """``row``'s line of the table: both sides' median step, the speed (the reference's time over tuneforge's)
    and whether both did the work (first -> last loss, tuneforge / reference)."""
    t, r = ("tuneforge", row), ("reference", row)
    return (f"| {label} | {statistics.median(seconds[t]):.2f} | {statistics.median(seconds[r]):.2f} "
            f"| {median_ratio(seconds, r, t):.2f}x | {'yes' if works[t] and works[r] else 'NO'}: "
            f"{losses[t][0]:.3f} -> {losses[t][-1]:.3f} / {losses[r][0]:.3f} -> {losses[r][-1]:.3f} |")


def stepper(model, params: dict, lr: float, loss_of, autocast):
    """One optimizer step of ``model`` on the batch (``loss_of(model)``, computed in the context ``autocast()``
    gives), returning the loss before it."""
    import torch

    optimizer = torch.optim.AdamW(params.values(), lr=lr)

    def step() -> float:
        model.train()
        with autocast():
            loss = loss_of(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


if __name__ == "__main__":
    main()
