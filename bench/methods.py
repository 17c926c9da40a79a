"""Every method's step time and peak memory: tuneforge against the reference stack, side by side.

Two workloads on the default model, the same tokens for both sides:
- text: batch 4 x 256 tokens of packed tinyshakespeare, every position carrying loss;
- sentiment: the LoRA recipe's batches (8 movie-review prompts, loss on the answer only).

Methods: LoRA r=16 alpha=32 on all linear layers (dropout 0.05 and 0), full fine-tuning, QLoRA (NF4,
double quantization; the reference: bitsandbytes 4-bit with PEFT), prompt and prefix tuning (20
virtual tokens; the reference: PEFT). The reference trains with transformers' Trainer. Each
configuration runs in its own process (its peak RSS is its own), the two sides alternating, and
times its optimizer steps after the first; a row reports medians, the ratios, whether training lowered
the loss of one fixed batch (the first, scored in eval mode before and after by each side's own code)
and moved the weights on both sides (no side is fast because it skips work), and the share of the
matmul rate each reaches (the step's floating-point work as tuneforge's estimate counts it). The
tuneforge side also records its estimate, for bench/estimate.py.

    python bench/methods.py                      # every row of both workloads; writes BENCHMARKS.md
    python bench/methods.py --rows lora,full --workloads text --steps 6
    python bench/methods.py --device cuda --model DIR   # bench/gpu.sh: DIR a model of the default's shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import rss_mb, spawn, step_seconds, trainer_timer  # noqa: E402  (the repository on the path first)

LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
ROWS = {  # label: (tuneforge method, its keys, the reference's kind)
    "LoRA, dropout 0.05": ("lora", {**LORA, "lora_dropout": 0.05}, "lora"),
    "LoRA, dropout 0": ("lora", {**LORA, "lora_dropout": 0.0}, "lora"),
    "full fine-tuning": ("full", {}, "full"),
    "QLoRA (NF4)": ("qlora", {**LORA, "lora_dropout": 0.05}, "qlora"),
    "prompt tuning, 20 tokens": ("prompt", {"num_virtual_tokens": 20}, "prompt"),
    "prefix tuning, 20 tokens": ("prefix", {"num_virtual_tokens": 20}, "prefix"),
}
SHORT = {"lora": "LoRA, dropout 0.05", "lora0": "LoRA, dropout 0", "full": "full fine-tuning", "qlora": "QLoRA (NF4)",
         "prompt": "prompt tuning, 20 tokens", "prefix": "prefix tuning, 20 tokens"}
WORKLOADS = {
    "text": {"set": ["data.path=data/shakespeare/tinyshakespeare.txt", "data.format=text", "data.max_length=256",
                     "train.batch_size=4"], "config": "configs/shakespeare-full.yaml", "lr": 1e-4},
    "sentiment": {"set": ["train.batch_size=8"], "config": "configs/sentiment-lora.yaml", "lr": 2e-4},
}


DEVICE = "cpu"  # --device: cuda for bench/gpu.sh
MODEL = MODEL_DEFAULT = "smollm2-135m"  # --model: another of the same shape where the default model's file cannot go (a GPU machine)


def run_config(method: str, keys: dict, workload: str, steps: int):
    """The run config of one row: the workload's data and batch, the row's method, ``steps`` steps."""
    from tuneforge.core import config

    w = WORKLOADS[workload]
    sets = [*w["set"], f"train.max_steps={steps}", f"data.max_examples={steps * 8}", f"train.learning_rate={w['lr']}",
            "train.lr_schedule=constant", "data.group_by_length=true", "train.warmup_steps=0", "train.logging_steps=1",
            f"train.device={DEVICE}", f"model={MODEL}"]
    raw = config.to_dict(config.from_yaml(REPO / w["config"], sets))
    return config.from_dict({**raw, "method": {"name": method, **keys}})


def child_tuneforge(method: str, keys: dict, workload: str, steps: int) -> dict:
    import torch

    from tuneforge.data import Collator, load_datasets
    from tuneforge.eval.lm import label_loss
    from tuneforge.io.load import load_model
    from tuneforge.methods.registry import get_method
    from tuneforge.training.loop import train
    from tuneforge.training.prepare import prepare
    from tuneforge.training.run import batch_order, run_estimate

    cfg = run_config(method, keys, workload, steps)
    model, tokenizer = load_model(cfg.model, dtype="float32", device=DEVICE)
    data = load_datasets(cfg.data, tokenizer, seed=0)
    est = run_estimate(cfg, data, tokenizer, model.config)
    _, params = prepare(model, get_method(method), cfg)  # as a run prepares it
    before = {k: p.detach().clone() for k, p in params.items()}
    order = batch_order(cfg, data)
    fixed = {k: v.to(DEVICE) for k, v in Collator(tokenizer.pad_token_id)([data.train[i] for i in order(0)[0]]).items()}

    def fixed_loss() -> float:  # the mean token loss of the first batch, dropout off
        model.eval()
        with torch.no_grad():
            total, n = label_loss(model, fixed["input_ids"], fixed["attention_mask"], fixed["labels"])
        return total.item() / n

    fixed_before = fixed_loss()
    times = []

    def on_step(step):
        times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = train(model, params, data.train, Collator(tokenizer.pad_token_id), cfg.train, out,
                        batch_order=order, progress=False, on_step=on_step)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    moved = max((p.detach() - before[k]).abs().max().item() for k, p in params.items())
    return {"step_seconds": step_seconds(times, start), "tokens_per_step": summary.tokens / summary.steps,
            "peak_rss_mb": rss_mb(), "first_loss": losses[0], "last_loss": losses[-1], "moved": moved,
            "fixed_before": fixed_before, "fixed_after": fixed_loss(),
            "estimate": {"peak_mb": est.peak_bytes / 2**20, "step_seconds": est.step_seconds, "work": est.work,
                         "flops_per_step": est.flops_per_step, "parts_mb": {k: v / 2**20 for k, v in est.parts.items()}},
            "shared_tokens": summary.shared_prefix_tokens}


def child_reference(method: str, keys: dict, kind: str, workload: str, steps: int) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tuneforge.data import load_datasets
    from tuneforge.io.load import load_tokenizer, resolve_spec
    from tuneforge.training.run import batch_order

    cfg = run_config(method, keys, workload, steps)
    tokenizer = load_tokenizer(cfg.model)
    data = load_datasets(cfg.data, tokenizer, seed=0)
    order = [i for batch in batch_order(cfg, data)(0) for i in batch]  # tuneforge's batches, in its order
    rows = [{"input_ids": data.train[i].input_ids, "attention_mask": [1] * len(data.train[i].input_ids),
             "labels": data.train[i].labels} for i in order]
    kwargs = {"dtype": torch.float32}
    if kind == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.float32)
    if DEVICE != "cpu":  # on the device from the start, as the Trainer will hold it (the weights compared after)
        kwargs["device_map"] = {"": DEVICE}
    model = AutoModelForCausalLM.from_pretrained(resolve_spec(cfg.model), **kwargs)
    if kind in ("lora", "qlora"):
        if kind == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=keys["r"],
                                                           lora_alpha=keys["lora_alpha"],
                                                           lora_dropout=keys["lora_dropout"],
                                                           target_modules="all-linear"))
    elif kind == "prompt":
        model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    elif kind == "prefix":
        model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    fixed = collate(rows[:cfg.train.batch_size])

    def fixed_loss() -> float:  # the mean token loss of the first batch, dropout off
        model.eval()
        with torch.no_grad():
            return model(**{k: v.to(model.device) for k, v in fixed.items()}).loss.item()

    fixed_before = fixed_loss()
    times, losses = [], []

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.train.batch_size,
                                 learning_rate=cfg.train.learning_rate, max_steps=steps, lr_scheduler_type="constant",
                                 logging_steps=1, save_strategy="no", report_to=[], use_cpu=DEVICE == "cpu",
                                 bf16=DEVICE != "cpu",
                                 dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[trainer_timer(times, losses)],
                          data_collator=collate)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)  # tuneforge's order
        start = time.perf_counter()
        trainer.train()
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in params.items())
    tokens = sum(len(r["input_ids"]) for r in rows[: steps * cfg.train.batch_size]) / steps
    return {"step_seconds": step_seconds(times, start), "tokens_per_step": tokens, "peak_rss_mb": rss_mb(),
            "first_loss": losses[0], "last_loss": losses[-1], "moved": moved, "fixed_before": fixed_before,
            "fixed_after": fixed_loss()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(SHORT), help=f"some of {', '.join(SHORT)}")
    parser.add_argument("--workloads", default="text,sentiment")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: 6 text, 10 sentiment)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bench/gpu.sh)")
    parser.add_argument("--model", default=MODEL_DEFAULT, help="the model (a named one, a folder or a .gguf file)")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "ROW", "WORKLOAD"))
    args = parser.parse_args()
    global DEVICE, MODEL
    DEVICE, MODEL = args.device, args.model
    if args.child:
        side, row, workload = args.child
        method, keys, kind = ROWS[SHORT[row]]
        fn = child_tuneforge if side == "tuneforge" else lambda *a: child_reference(method, keys, kind, workload,
                                                                                    args.steps)
        result = fn(method, keys, workload, args.steps) if side == "tuneforge" else fn()
        print("RESULT " + json.dumps(result))
        return

    from bench.report import machine, write_section
    from tuneforge.model.devices import resolve_device
    from tuneforge.training.estimate import matmul_flops_per_s

    import torch

    device = resolve_device(args.device)
    # the rate of the dtype a step's matmuls run in: train.precision auto is bf16 on CUDA, fp32 on the CPU
    rate = matmul_flops_per_s(device, size=2048, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    results = {}
    for workload in args.workloads.split(","):
        steps = args.steps or {"text": 6, "sentiment": 10}[workload]
        for row in args.rows.split(","):
            for side in ("tuneforge", "reference"):
                r = spawn(__file__, ["--child", side, row, workload, "--steps", str(steps), "--device", args.device,
                                     "--model", args.model], REPO)
                results[(workload, row, side)] = r
                shown = r.get("error") or f"{r['step_seconds']:.2f} s/step, {r['peak_rss_mb']:.0f} MB, first " \
                                          f"batch's loss {r['fixed_before']:.3f} -> {r['fixed_after']:.3f}" + \
                                          (f", {r['stolen']:.1%} of the CPU stolen" if "stolen" in r else "")
                print(f"{workload:>9} {SHORT[row]:>26} {side:>9}: {shown}", flush=True)
    # the CPU's runs only are methods*.json, the runs bench/estimate.py fits its time model on
    out = REPO / "bench" / "results" / ("methods.json" if device.type == "cpu" else f"{device.type}-methods.json")
    out.parent.mkdir(exist_ok=True)
    # The host beside the rows: bench/estimate.py fits the time model on the runs of every host kept here
    host = {"machine": machine(), "matmul_flops_per_s": rate, "date": time.strftime("%Y-%m-%d")}
    out.write_text(json.dumps({"host": host, **{f"{w}|{r}|{s}": v for (w, r, s), v in results.items()}}, indent=1))
    write_section("methods" if args.device == "cpu" else f"methods-{args.device}", table(results, rate, args, machine()))


def table(results: dict, rate: float, args, machine_line: str) -> str:
    cpu = args.device == "cpu"
    command = " ".join(["python bench/methods.py", *([] if cpu else [f"--device {args.device}"]),
                        *([] if args.model == MODEL_DEFAULT else [f"--model {Path(args.model).name}"])])
    rates = ("the matmul shares below use each row's own measurement" if cpu else
             "the steps run under bf16 autocast, train.precision auto on CUDA")
    lines = [f"## Every method, step by step\n\n`{command}` on {machine_line}; the matmul rate "
             f"measured at 2048 x 2048 {'fp32' if cpu else 'bf16'} as the benchmark started: {rate / 1e9:.0f} "
             f"GFLOP/s ({rates}). Medians of the timed steps (each run's "
             "first step excluded), each configuration in its own process, the two sides alternating. \"works\": "
             "on both sides, the trained weights moved and training lowered the loss of one fixed batch (the "
             "first, scored in eval mode before and after by the side's own code: before -> after).\n"]
    for workload in args.workloads.split(","):
        lines += [f"\n### {workload}: " + ("batch 4 x 256 packed tinyshakespeare, loss on every position"
                                           if workload == "text" else "the LoRA recipe's batches of 8 prompts, "
                                                                       "loss on the answer"), "",
                  "| method | tuneforge s/step | reference s/step | speed | tuneforge peak RSS (MB) | reference "
                  "(MB) | memory | matmul share, tuneforge / reference | works |", "|---|---|---|---|---|---|---|---|---|"]
        for row in args.rows.split(","):
            ours, ref = results[(workload, row, "tuneforge")], results[(workload, row, "reference")]
            if "error" in ours or "error" in ref:
                lines.append(f"| {SHORT[row]} | {ours.get('error', '')} | {ref.get('error', '')} | | | | | | |")
                continue
            flops = ours["estimate"]["flops_per_step"]
            row_rate = ours["estimate"].get("work", {}).get("rate", rate) if cpu else rate  # the row's own on the CPU
            works = all(r["fixed_after"] < r["fixed_before"] and r["moved"] > 0 for r in (ours, ref))
            lines.append(f"| {SHORT[row]} | {ours['step_seconds']:.2f} | {ref['step_seconds']:.2f} | "
                         f"{ref['step_seconds'] / ours['step_seconds']:.2f}x | {ours['peak_rss_mb']:.0f} | "
                         f"{ref['peak_rss_mb']:.0f} | {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x | "
                         f"{flops / ours['step_seconds'] / row_rate:.0%} / {flops / ref['step_seconds'] / row_rate:.0%} | "
                         f"{'yes' if works else 'NO'}: {ours['fixed_before']:.2f} -> {ours['fixed_after']:.2f} / "
                         f"{ref['fixed_before']:.2f} -> {ref['fixed_after']:.2f} |")
    lines.append("\nThe matmul share divides the floating-point work of tuneforge's step (its estimate's count, which "
                 "runs a shared prefix once) by the step's time and the matmul rate tuneforge's run of that row "
                 "measured as it started (1024 x 1024 fp32; the rate of a shared machine drifts, so each row uses "
                 "its own), for both sides: the reference does at least that work, so its share is an upper bound "
                 "of its own.")
    stolen = {key: r["stolen"] for key, r in results.items() if "stolen" in r}
    if stolen:
        worst = max(stolen, key=stolen.get)
        lines.append(f"\nThe CPU time the machine's host gave to other guests while a row ran (`/proc/stat`'s "
                     f"steal): at most {stolen[worst]:.1%} ({worst[0]}, {SHORT[worst[1]]}, {worst[2]}), a median of "
                     f"{statistics.median(stolen.values()):.1%}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
