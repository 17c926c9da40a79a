"""The LoRA sentiment recipe end to end: tuneforge against Transformers + PEFT, from process start to
saved adapter, then both adapters scored by one evaluator on every snippet neither trained on.

Both sides do the same work. tuneforge runs its command line on the shipped recipe (``tuneforge train
configs/sentiment-lora.yaml``), which evaluates the recipe's held-out split at the end; the reference
is the standard recipe on the same examples in the same order: transformers' Trainer, PEFT's LoRA
(r=16, alpha=32, dropout 0.05, all linear layers), batch 8, lr 2e-4 linear, DataCollatorForSeq2Seq,
then the same held-out split labelled the plain way (``bench/evaluation.py``'s reference) and
``save_pretrained``. Each side is its own process, timed from its start; its peak RSS is read from the
kernel when it exits. tuneforge also keeps a checkpoint every 25 steps (its time includes writing them).

Then each adapter (PEFT's loaded by tuneforge) is scored as ``tuneforge eval --unseen`` scores: the
recipe's whole held-out split and the training rows past the ones trained on. And the time to the
reference's accuracy: tuneforge's checkpoints and the reference's adapter scored by one evaluator on
the held-out split; the first checkpoint at or above the reference's final figure, and the training
seconds it took (tuneforge's loop to that step, against the Trainer's whole run).

    python bench/lora_vs_peft.py              # the whole recipe: 250 steps, about 35 min here
    python bench/lora_vs_peft.py --steps 30   # a shorter run of the same recipe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "sentiment-lora.yaml"


def sets(steps: int, out: Path) -> list[str]:
    return [f"train.max_steps={steps}", f"data.max_examples={steps * 8}", f"train.output_dir={out}",
            "train.eval_at_start=false", "train.save_steps=0"]


def timed(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time from start to exit and the kernel's peak RSS of that process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{stderr[-3000:]}")
    return {"seconds": seconds, "stdout": stdout, "stderr": stderr, "peak_rss_mb": usage.ru_maxrss / 1024}


def child_reference(steps: int, out: Path) -> None:
    """The reference recipe, in this process: train, save the adapter, print the peak RSS."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tuneforge.core import config
    from tuneforge.data import load_datasets
    from tuneforge.io.load import load_tokenizer, resolve_spec
    from tuneforge.training.run import batch_order

    cfg = config.from_yaml(CONFIG, sets(steps, out))
    tokenizer = load_tokenizer(cfg.model)
    data = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    order = [i for batch in batch_order(cfg, data)(0) for i in batch]
    rows = [{"input_ids": data.train[i].input_ids, "attention_mask": [1] * len(data.train[i].input_ids),
             "labels": data.train[i].labels} for i in order]
    model = AutoModelForCausalLM.from_pretrained(resolve_spec(cfg.model), dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules="all-linear"))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=8, learning_rate=2e-4, max_steps=steps,
                                 lr_scheduler_type="linear", logging_steps=max(steps // 5, 1), save_strategy="no",
                                 report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)  # tuneforge's batches
        result = trainer.train()
    from bench.evaluation import reference_predictions  # the same held-out rows tuneforge's run evaluates
    from tuneforge.data import word_ids

    model.eval()
    answers = [word_ids(tokenizer, w, cfg.data.chat_template) for w in data.label_words]
    predicted = reference_predictions(model, tokenizer.pad_token_id, [it.prompt_ids for it in data.eval_items], answers)
    accuracy = sum(p == it.label for p, it in zip(predicted, data.eval_items)) / len(predicted)
    model.save_pretrained(out / "final")
    print(f"LOSS {result.training_loss}")
    print(f"HELDOUT {accuracy} {len(predicted)}")
    print(f"RUNTIME {result.metrics['train_runtime']}")


def child_score(steps: int, adapter: Path) -> None:
    """Both sides' adapters scored the same way: tuneforge's evaluator on every unseen snippet."""
    from tuneforge.core import config
    from tuneforge.eval.run import evaluate_unseen
    from tuneforge.io.load import load_model
    from tuneforge.io.peft_format import load_adapter

    cfg = config.from_yaml(CONFIG, sets(steps, adapter.parent))
    model, tokenizer = load_model(cfg.model, dtype="float32", device="cpu")
    load_adapter(model, adapter)
    m = evaluate_unseen(model, tokenizer, cfg, cfg.data.path)
    held = m["parts"]["held_out"]
    print("SCORE " + json.dumps({"held_out": held["accuracy"], "held_out_n": held["n"], "unseen": m["accuracy"],
                                 "unseen_n": m["n"], "ci95": m["accuracy_ci95"]}))


def child_progress(steps: int, run: Path, reference: Path) -> None:
    """The held-out accuracy (the recipe's split, tuneforge's evaluator) of the reference's adapter and of
    each of tuneforge's checkpoints, with the training seconds tuneforge's run had spent at its step."""
    from safetensors.torch import load_file

    from tuneforge.core import config
    from tuneforge.data import load_datasets
    from tuneforge.eval.evaluator import make_evaluator
    from tuneforge.io.load import load_model
    from tuneforge.io.peft_format import load_adapter

    cfg = config.from_yaml(CONFIG, sets(steps, run))
    model, tokenizer = load_model(cfg.model, dtype="float32", device="cpu")
    evaluator = make_evaluator(tokenizer, load_datasets(cfg.data, tokenizer, seed=cfg.train.seed), cfg)
    seconds = {r["step"]: r["seconds"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "seconds" in r}
    load_adapter(model, reference)
    result = {"reference": evaluator.run(model)["accuracy"], "checkpoints": []}
    model, _ = load_model(cfg.model, dtype="float32", device="cpu")
    load_adapter(model, run / "final")
    for folder in sorted((run / "checkpoints").glob("step-*")):
        _, unexpected = model.load_state_dict(load_file(folder / "trainable.safetensors"), strict=False)
        assert not unexpected, unexpected
        step = int(folder.name.split("-")[1])
        result["checkpoints"].append({"step": step, "seconds": seconds[step],
                                      "accuracy": evaluator.run(model)["accuracy"]})
    print("PROGRESS " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250, help="250 is the whole recipe: one epoch over 2,000 snippets")
    parser.add_argument("--child", choices=["reference", "score", "progress"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reference", type=Path)
    args = parser.parse_args()
    if args.child == "reference":
        return child_reference(args.steps, args.out)
    if args.child == "score":
        return child_score(args.steps, args.out)
    if args.child == "progress":
        return child_progress(args.steps, args.out, args.reference)
    every = 25 if args.steps >= 50 else max(args.steps // 2, 1)
    kept = [f"train.save_steps={every}", f"train.logging_steps={every}", f"train.keep_checkpoints={args.steps // every + 1}"]

    with tempfile.TemporaryDirectory() as tmp:
        runs = {"tuneforge": Path(tmp) / "tuneforge", "reference": Path(tmp) / "reference"}
        results = {
            "tuneforge": timed([sys.executable, "-m", "tuneforge", "train", str(CONFIG),
                                *(a for s in sets(args.steps, runs["tuneforge"]) + kept for a in ("--set", s))]),
            "reference": timed([sys.executable, __file__, "--child", "reference", "--steps", str(args.steps),
                                "--out", str(runs["reference"])]),
        }
        for side, r in results.items():
            score = timed([sys.executable, __file__, "--child", "score", "--steps", str(args.steps),
                           "--out", str(runs[side] / "final")])
            r["score"] = json.loads(next(line for line in score["stdout"].splitlines()
                                         if line.startswith("SCORE "))[len("SCORE "):])
            r["adapter_mb"] = sum(f.stat().st_size for f in (runs[side] / "final").rglob("*") if f.is_file()) / 2**20
            print(f"{side:>9}: {r['seconds'] / 60:.1f} min start to saved adapter, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"accuracy {r['score']['unseen']:.2%} on {r['score']['unseen_n']} unseen", flush=True)
        progress = timed([sys.executable, __file__, "--child", "progress", "--steps", str(args.steps),
                          "--out", str(runs["tuneforge"]), "--reference", str(runs["reference"] / "final")])
        progress = json.loads(next(line for line in progress["stdout"].splitlines()
                                   if line.startswith("PROGRESS "))[len("PROGRESS "):])
        summary = json.loads((runs["tuneforge"] / "summary.json").read_text())
    ref_lines = dict(line.split(" ", 1) for line in results["reference"]["stdout"].splitlines() if " " in line)
    ref_runtime = float(ref_lines["RUNTIME"])
    held = results["tuneforge"]["held_out_own"] = summary["after"]["accuracy"]
    results["reference"]["held_out_own"] = float(ref_lines["HELDOUT"].split()[0])
    reached = next((c for c in progress["checkpoints"] if c["accuracy"] >= progress["reference"]), None)
    print(f"held-out, each side's own evaluation: tuneforge {held:.2%}, reference "
          f"{results['reference']['held_out_own']:.2%}; progress {progress}", flush=True)
    ours, ref = results["tuneforge"], results["reference"]
    out = REPO / "bench" / "results" / "lora_vs_peft.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**{side: {k: v for k, v in r.items() if k not in ("stdout", "stderr")}
                                  for side, r in results.items()}, "progress": progress,
                               "reference_train_seconds": ref_runtime}, indent=1))
    if reached:
        to_accuracy = (f"tuneforge's checkpoint at step {reached['step']} scored {reached['accuracy']:.2%}, at or above "
                       f"the reference's final {progress['reference']:.2%}, after {reached['seconds']:.0f} s of "
                       f"training; the reference's Trainer ran {ref_runtime:.0f} s: "
                       f"{reached['seconds'] / ref_runtime:.2f}x the time to its accuracy.")
    else:
        to_accuracy = (f"no checkpoint of tuneforge's reached the reference's final {progress['reference']:.2%} "
                       f"(tuneforge's best: {max(c['accuracy'] for c in progress['checkpoints']):.2%}).")

    from bench.report import machine, write_section

    def row(name: str, r: dict) -> str:
        s = r["score"]
        return (f"| {name} | {r['seconds'] / 60:.1f} | {r['peak_rss_mb']:.0f} | {s['held_out']:.2%} | {s['unseen']:.2%} "
                f"({s['ci95'][0]:.1%} to {s['ci95'][1]:.1%}) |")

    write_section("lora_vs_peft", f"""
## The LoRA sentiment recipe, end to end: tuneforge vs Transformers + PEFT

`python bench/lora_vs_peft.py --steps {args.steps}` on {machine()}. Default model, LoRA r=16 alpha=32
dropout 0.05 on all linear layers, batch 8, lr 2e-4 linear, {args.steps} steps over the same
{args.steps * 8:,} movie-review snippets in the same batches (chat prompts, loss on the answer only).
Wall time from process start to saved adapter, the same work on both sides: each evaluates the
recipe's held-out split at the end with its own code (tuneforge's run also writes a checkpoint every
{every} steps). Accuracy: each adapter (PEFT's saved by PEFT, loaded by tuneforge) scored by the same
evaluator on the recipe's {ours['score']['held_out_n']:,}-snippet held-out split and on all
{ours['score']['unseen_n']:,} snippets the run never trained on; each side's own figure on its
{ref_lines["HELDOUT"].split()[1]} evaluated snippets in the last column.

| | minutes, start to saved adapter | peak RSS (MB) | accuracy, held-out split | accuracy, every unseen snippet (95% interval) | its own evaluation |
|---|---|---|---|---|---|
{row("tuneforge", ours)} {ours['held_out_own']:.2%} |
{row("Transformers + PEFT", ref)} {ref['held_out_own']:.2%} |
| ratio | {ours['seconds'] / ref['seconds']:.2f}x the time | {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x | | {100 * (ours['score']['unseen'] - ref['score']['unseen']):+.2f} points | |

Time to the reference's accuracy (both scored by tuneforge's evaluator on the run's held-out split):
{to_accuracy}

tuneforge's run computed {summary['shared_prefix_tokens']:,} fewer token positions than it was given
({summary['shared_prefix_tokens'] / max(summary['tokens'], 1):.0%}): every batch's rows share the chat
template's system turn and the question, which run once per batch. The other savings are the output
head applied only where a label is, batches of similar length, and the LoRA and MLP steps keeping
little for backward (`tuneforge/model/kernels.py`).
""")


if __name__ == "__main__":
    main()
