"""LoRA training speed and memory: tuneforge against Transformers + PEFT, same recipe, same data.

The recipe: the default model, LoRA r=16 alpha=32 dropout 0.05 on all linear layers but the
head, batch 8, lr 2e-4, movie-review sentiment snippets as chat prompts with the loss on the answer
only. The reference is the standard one: Trainer, DataCollatorForSeq2Seq (dynamic padding).
Each side runs in its own process (so peak RSS is its own) for the same number of optimizer
steps over the same examples in the same order of files.

    python bench/lora_vs_peft.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = dict(r=16, lora_alpha=32, lora_dropout=0.05, batch_size=8, learning_rate=2e-4)


def examples(n: int):
    from tuneforge import config
    from tuneforge.data import load_datasets
    from tuneforge.io.load import load_model

    cfg = config.from_yaml(REPO / "configs" / "sentiment-lora.yaml", [f"data.max_examples={n}"])
    model, tokenizer = load_model(cfg.model, dtype="float32", device="cpu")
    data = load_datasets(cfg.data, tokenizer, seed=0)
    return model, tokenizer, data.train, cfg


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def accuracy(model, tokenizer, cfg) -> dict:
    """Both sides' adapters scored by tuneforge's evaluator on every snippet the run never trained on:
    the config's whole held-out split, and the training split's snippets past the ones trained on."""
    from tuneforge.eval.run import evaluate_unseen

    m = evaluate_unseen(model, tokenizer, cfg, cfg.data.path)
    held = m["parts"]["held_out"]
    return {"held_out_accuracy": held["accuracy"], "held_out_n": held["n"], "unseen_accuracy": m["accuracy"],
            "unseen_n": m["n"], "unseen_ci95": m["accuracy_ci95"]}


def child_tuneforge(steps: int, scored: bool) -> dict:
    from tuneforge.data import Collator, length_grouped_batches
    from tuneforge.methods import lora
    from tuneforge.training.loop import train

    model, tokenizer, train_set, cfg = examples(steps * RECIPE["batch_size"])
    adapter = lora.inject(model, lora.Config(r=RECIPE["r"], lora_alpha=RECIPE["lora_alpha"],
                                             lora_dropout=RECIPE["lora_dropout"], target_modules="all-linear"))
    lengths = [len(e.input_ids) for e in train_set]
    order = lambda epoch: length_grouped_batches(lengths, RECIPE["batch_size"], 0, epoch)  # noqa: E731
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = train(model, adapter.trainable(model), train_set, Collator(tokenizer.pad_token_id),
                        cfg.train.__class__(max_steps=steps, batch_size=RECIPE["batch_size"],
                                            learning_rate=RECIPE["learning_rate"], lr_schedule="linear"),
                        out, batch_order=order, progress=False)
    result = {"seconds": time.perf_counter() - start, "steps": summary.steps, "tokens": summary.tokens,
              "loss": summary.final_loss}
    result["peak_rss_mb"] = peak_rss_mb()  # training's peak, before the scoring below
    if scored:
        result.update(accuracy(model, tokenizer, cfg))
    return result


def child_peft(steps: int, scored: bool) -> dict:
    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer, train_set, cfg = examples(steps * RECIPE["batch_size"])
    model = peft.get_peft_model(model, peft.LoraConfig(r=RECIPE["r"], lora_alpha=RECIPE["lora_alpha"],
                                                       lora_dropout=RECIPE["lora_dropout"],
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in train_set]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=RECIPE["batch_size"],
                                 learning_rate=RECIPE["learning_rate"], max_steps=steps, lr_scheduler_type="linear",
                                 logging_steps=steps, save_strategy="no", report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        out = {"seconds": seconds, "steps": steps, "loss": result.training_loss,
               "tokens": sum(len(r["input_ids"]) for r in rows[: steps * RECIPE["batch_size"]]),
               "torch_threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb()}
        if scored:  # PEFT's adapter, saved by PEFT, loaded by tuneforge onto a fresh base and scored
            from tuneforge import load_adapter
            from tuneforge.io.load import load_model

            model.save_pretrained(Path(tmp) / "peft-adapter")
            base, _ = load_model(cfg.model, dtype="float32", device="cpu")
            load_adapter(base, Path(tmp) / "peft-adapter")
            out.update(accuracy(base, tokenizer, cfg))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accuracy", action="store_true",
                        help="also score each side's adapter on every snippet it never trained on "
                             "(--steps 250 is the whole recipe: one epoch over 2,000 snippets)")
    parser.add_argument("--child", choices=["tuneforge", "peft"])
    args = parser.parse_args()
    if args.child:
        result = (child_tuneforge if args.child == "tuneforge" else child_peft)(args.steps, args.accuracy)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for side in ("tuneforge", "peft"):
        proc = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(args.steps)]
                              + ["--accuracy"] * args.accuracy, capture_output=True, text=True)
        line = [out for out in proc.stdout.splitlines() if out.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[0][len("RESULT "):])
        r = results[side]
        print(f"{side:>9}: {r['seconds'] / r['steps']:.2f} s/step, {r['tokens'] / r['seconds']:.0f} tokens/s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, final loss {r['loss']:.4f}"
              + (f", accuracy {r['held_out_accuracy']:.2%} on {r['held_out_n']} held out, "
                 f"{r['unseen_accuracy']:.2%} on all {r['unseen_n']} unseen" if args.accuracy else ""))
    ours, ref = results["tuneforge"], results["peft"]
    speed = (ref["seconds"] / ref["steps"]) / (ours["seconds"] / ours["steps"])
    memory = ours["peak_rss_mb"] / ref["peak_rss_mb"]
    print(f"tuneforge is {speed:.2f}x as fast per step and uses {memory:.2f}x the peak memory")

    from bench.report import machine, write_section

    acc_head, acc_rule = (" accuracy, held-out split | accuracy, every unseen snippet (95% interval) |",
                          "---|---|") if args.accuracy else ("", "")

    def acc(r: dict) -> str:
        if not args.accuracy:
            return ""
        low, high = r["unseen_ci95"]
        return f" {r['held_out_accuracy']:.2%} | {r['unseen_accuracy']:.2%} ({low:.1%} to {high:.1%}) |"

    accuracy_note = (f"""
Accuracy: each side's adapter (PEFT's saved by PEFT, loaded by tuneforge) scored by the same
evaluator, as `tuneforge eval --unseen` scores: on the {ours['held_out_n']:,} snippets of
configs/sentiment-lora.yaml's held-out split, and on all {ours['unseen_n']:,} snippets the run never trained
on (that split and the training split's snippets past the {args.steps * RECIPE['batch_size']:,} trained on).
""" if args.accuracy else "")

    write_section("lora_vs_peft", f"""
## LoRA training: tuneforge vs Transformers + PEFT

`python bench/lora_vs_peft.py --steps {args.steps}{" --accuracy" * args.accuracy}` on {machine()}. Default model, LoRA r=16
alpha=32 dropout 0.05 on all linear layers, batch 8, lr 2e-4, {args.steps} steps over the same
movie-review examples (chat prompts, loss on the answer only). Reference: Trainer with
DataCollatorForSeq2Seq (dynamic padding).

| | s/step | tokens/s | peak RSS (MB) |{acc_head}
|---|---|---|---|{acc_rule}
| tuneforge | {ours['seconds'] / ours['steps']:.2f} | {ours['tokens'] / ours['seconds']:.0f} | {ours['peak_rss_mb']:.0f} |{acc(ours)}
| Transformers + PEFT | {ref['seconds'] / ref['steps']:.2f} | {ref['tokens'] / ref['seconds']:.0f} | {ref['peak_rss_mb']:.0f} |{acc(ref)}
| ratio | {speed:.2f}x faster | | {memory:.2f}x |{" | |" if args.accuracy else ""}
{accuracy_note}
tuneforge's speed comes from two things: batches of similar length (little padding) and the
output head applied only at the positions that carry loss (2 of about {ours['tokens'] / (ours['steps'] * RECIPE['batch_size']):.0f}
tokens per example here), where the reference projects every position onto the 49,152-word
vocabulary.
""")


if __name__ == "__main__":
    main()
