"""DPO with LoRA on the default model: tuneforge against TRL + PEFT side by side, and the memory of a
DPO step against an SFT step on the same rows (each pair's prompt with its chosen and with its rejected
answer: the tokens a DPO step runs), for LoRA and QLoRA: one copy of the base either way.

The shipped pairs (data/preference/self_instruct_pairs_train.jsonl: a Self-Instruct prompt, its human
answer chosen, the default model's own greedy reply rejected), in file order, batches of 4 pairs, LoRA
r=16 alpha=32 on all linear layers, dropout 0, AdamW at a constant 5e-4, fp32 on CPU. tuneforge's DPO
reference is the model with LoRA off; TRL's, for a PEFT model, the same (its adapter disabled). Each
row runs in its own process (its peak RSS is its own) and times its optimizer steps after the first;
a row reports medians, whether the loss fell and the weights moved (no side is fast because it skips
work).

    python bench/preference.py                 # writes the "preference" section of BENCHMARKS.md
    python bench/preference.py --steps 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import rss_mb, spawn, step_seconds, trainer_timer  # noqa: E402  (the repository on the path first)

PAIRS = REPO / "data" / "preference" / "self_instruct_pairs_train.jsonl"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
BATCH, LR = 4, 5e-4
ROWS = {  # name: (side, objective, method)
    "dpo-lora": ("tuneforge", "dpo", "lora"),
    "dpo-lora-trl": ("trl", "dpo", "lora"),
    "sft-lora": ("tuneforge", "sft", "lora"),
    "dpo-qlora": ("tuneforge", "dpo", "qlora"),
    "sft-qlora": ("tuneforge", "sft", "qlora"),
}


def rows(steps: int) -> list[dict]:
    lines = PAIRS.read_text().splitlines()[: steps * BATCH]
    return [json.loads(line) for line in lines]


def as_chat(row: dict) -> dict:
    """A pair as message lists (the shipped file holds them so already, or as text)."""
    def turn(role, value):
        return value if isinstance(value, list) else [{"role": role, "content": value}]

    return {"prompt": turn("user", row["prompt"]), "chosen": turn("assistant", row["chosen"]),
            "rejected": turn("assistant", row["rejected"])}


def child_tuneforge(objective: str, method: str, steps: int) -> dict:
    from tuneforge.core import config
    from tuneforge.data import load_datasets
    from tuneforge.io.load import load_model
    from tuneforge.methods.registry import get_method
    from tuneforge.training import objectives
    from tuneforge.training.loop import train
    from tuneforge.training.objectives import reference
    from tuneforge.training.prepare import prepare
    from tuneforge.training.run import collator

    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "rows.jsonl"
        pairs = [as_chat(r) for r in rows(steps)]
        # SFT on the same rows a DPO step runs: each pair's prompt with its chosen, then its rejected answer
        sft = [{"messages": p["prompt"] + p[answer]} for p in pairs for answer in ("chosen", "rejected")]
        data_file.write_text("".join(json.dumps(r) + "\n" for r in (pairs if objective != "sft" else sft)))
        cfg = config.from_dict({
            "method": {"name": method, **LORA},
            "data": {"path": str(data_file), "format": "preference" if objective != "sft" else "instruction",
                     "val_fraction": 0.0, "max_length": 512},
            "train": {"max_steps": steps, "batch_size": BATCH * (2 if objective == "sft" else 1), "learning_rate": LR,
                      "lr_schedule": "constant",
                      "objective": objective, "logging_steps": 1, "device": "cpu"}})
        model, tokenizer = load_model(cfg.model, dtype="float32", device="cpu")
        data = objectives.data(cfg.train, load_datasets(cfg.data, tokenizer, seed=0))
        injected, params = prepare(model, get_method(method), cfg)
        switch = reference.switched_off(model, injected) if objectives.module(objective).REFERENCE else None
        loss = objectives.make(cfg.train, switch)
        before = {k: p.detach().clone() for k, p in params.items()}
        size = cfg.train.batch_size
        order = [list(range(i, i + size)) for i in range(0, len(data.train), size)]  # file order, as TRL's side
        times = []
        start = time.perf_counter()
        summary = train(model, params, data.train, collator(cfg, tokenizer), cfg.train, Path(tmp) / "out",
                        batch_order=lambda epoch: order, progress=False, loss=loss,
                        on_step=lambda step: times.append(time.perf_counter()))
        records = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    moved = max((p.detach() - before[k]).abs().max().item() for k, p in params.items())
    return {"step_seconds": step_seconds(times, start), "peak_rss_mb": rss_mb(), "first_loss": losses[0],
            "last_loss": losses[-1], "moved": moved, "tokens_per_step": summary.tokens / summary.steps}


def child_trl(steps: int) -> dict:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from tuneforge.io.load import load_tokenizer, resolve_spec

    tokenizer = load_tokenizer("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(resolve_spec("smollm2-135m"), dtype=torch.float32)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                           lora_dropout=LORA["lora_dropout"], target_modules="all-linear")
    dataset = datasets.Dataset.from_list([as_chat(r) for r in rows(steps)])
    times, losses = [], []

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=BATCH, learning_rate=LR, max_steps=steps,
                         lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=512, beta=0.1,
                         dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[trainer_timer(times, losses)])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}
        start = time.perf_counter()
        trainer.train()
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in params.items())
    return {"step_seconds": step_seconds(times, start), "peak_rss_mb": rss_mb(), "first_loss": losses[0],
            "last_loss": losses[-1], "moved": moved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child", choices=sorted(ROWS))
    args = parser.parse_args()
    if args.child:
        side, objective, method = ROWS[args.child]
        result = child_trl(args.steps) if side == "trl" else child_tuneforge(objective, method, args.steps)
        print("RESULT " + json.dumps(result))
        return

    from bench.report import machine, write_section

    results = {}
    for name in ROWS:
        results[name] = r = spawn(__file__, ["--child", name, "--steps", str(args.steps)], REPO)
        shown = r.get("error") or f"{r['step_seconds']:.2f} s/step, {r['peak_rss_mb']:.0f} MB, loss " \
                                  f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}"
        print(f"{name:>13}: {shown}", flush=True)
    out = REPO / "bench" / "results" / "preference.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    write_section("preference", table(results, args.steps, machine()))


def table(results: dict, steps: int, machine_line: str) -> str:
    def works(r):
        return "error" not in r and r["last_loss"] < r["first_loss"] and r["moved"] > 0

    def ratio(a: str, b: str, key: str) -> str:
        ra, rb = results[a], results[b]
        return "" if "error" in ra or "error" in rb else f"{rb[key] / ra[key]:.2f}x"

    lines = [f"## Preference tuning: DPO against TRL, and against SFT\n\n`python bench/preference.py --steps {steps}` "
             f"on {machine_line}. The first {steps * BATCH} shipped pairs in file order, batches of {BATCH} pairs, "
             "LoRA r=16 on all linear layers, constant learning rate 5e-4, fp32; medians of the timed steps (each "
             "run's first step excluded), each row in its own process. \"works\": the loss fell and the weights "
             "moved.\n", "| row | s/step | peak RSS (MB) | loss, first -> last | works |", "|---|---|---|---|---|"]
    for name, (side, objective, method) in ROWS.items():
        r = results[name]
        label = f"{'TRL + PEFT' if side == 'trl' else 'tuneforge'} {objective.upper()}, {method}"
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | |")
            continue
        lines.append(f"| {label} | {r['step_seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['first_loss']:.4f} -> "
                     f"{r['last_loss']:.4f} | {'yes' if works(r) else 'NO'} |")
    lines += ["", f"- tuneforge DPO against TRL + PEFT DPO: speed {ratio('dpo-lora', 'dpo-lora-trl', 'step_seconds')}"
              f" (TRL's time over tuneforge's), memory {ratio('dpo-lora-trl', 'dpo-lora', 'peak_rss_mb')} "
              "(tuneforge's peak over TRL's).",
              f"- DPO's peak RSS over SFT's on the same rows (each pair's prompt with its chosen and its rejected "
              f"answer, a batch of {2 * BATCH}): LoRA {ratio('sft-lora', 'dpo-lora', 'peak_rss_mb')}, "
              f"QLoRA {ratio('sft-qlora', 'dpo-qlora', 'peak_rss_mb')}. The reference is the same model with the "
              "method off, so no second copy of the base is held. DPO runs each pair's two rows at that pair's "
              "own width (its prompt once), where the SFT batch pads its 8 rows to the longest: hence less. Its "
              "step time adds the no-grad reference forward and one forward a pair."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
