"""Held-out evaluation of the sentiment recipe: this version against the one before it and the reference.

The default model with LoRA r=16 on all linear layers, unmerged (B zero, so every side scores the base
model's answers through the adapter's extra work, as a run's evaluation does), labels the recipe's whole
held-out split (894 snippets) by the log-likelihood of each label word after the prompt. Four sides,
each in its own process, taking turns:

- tuneforge: the evaluator a run uses (``eval.evaluator.make_evaluator``), its batches cut by ``eval.batch_tokens``;
- before: ``eval/classify.py`` as it stood at commit BEFORE, loaded from git, on this version's
  primitives: the shared prefix run once per batch of 8, not once for the set;
- Transformers + PEFT: the plain way, batches of 8 prompts left-padded, the whole logits of the last
  position, the label words' columns compared;
- bf16: tuneforge's evaluator in a run with ``train.precision: bf16`` (bf16 autocast; the frozen linear layers
  held in bf16, ``training.precision.hold_frozen_linears``, the rest float32).

Each side reports its seconds, examples per second and accuracy; tuneforge and before must label the
same number right (the same arithmetic), and the reference closely.

    python bench/evaluation.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import rss_mb, spawn  # noqa: E402  (the repository on the path first)

CONFIG = REPO / "configs" / "sentiment-lora.yaml"
BEFORE = "3cec8da"  # the last commit before evaluation ran the prefix once per set
SIDES = ("tuneforge", "before", "reference", "bf16")
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}


def held_out(batch_size: int, precision: str = "auto", batch_tokens: int | None = None):
    from tuneforge.core import config
    from tuneforge.data import load_datasets
    from tuneforge.io.load import load_tokenizer

    tokens = "null" if batch_tokens is None else batch_tokens
    cfg = config.from_yaml(CONFIG, ["data.max_eval_examples=null", f"eval.batch_size={batch_size}",
                                    f"eval.batch_tokens={tokens}", f"train.precision={precision}"])
    tokenizer = load_tokenizer(cfg.model)
    return cfg, tokenizer, load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)


def _before_classify():
    """``eval/classify.py`` of commit BEFORE as a module of its own."""
    source = subprocess.run(["git", "show", f"{BEFORE}:tuneforge/eval/classify.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("classify_before", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def reference_predictions(model, pad_id: int, prompts: list[list[int]], answers: list[list[int]],
                          batch_size: int = 8) -> list[int]:
    """The plain way to label prompts with a Transformers model: batches left-padded, the whole logits
    of the last position, the (one-token) label words' columns compared. Returns each prompt's label."""
    import torch

    columns = [a[0] for a in answers]
    predicted = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            rows = prompts[i:i + batch_size]
            width = max(map(len, rows))
            ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
            predicted += logits[:, columns].argmax(1).tolist()
    return predicted


def matmul_floor(model, prompts: list[list[int]], batch_size: int, tokens: int, dtype) -> dict:
    """The matmul work of tuneforge's evaluation (the linear layers' for every position it computes: each
    prompt and its label word past the set's shared beginning, padded to its batch's longest, the batches
    cut as the evaluator cuts them; the head's for the one position per prompt that reaches it), and the
    device's matmul rate in ``dtype``: what the same work would take at that rate. Attention's own products
    are left out: a lower bound."""
    import os

    from torch import nn

    from tuneforge.eval.lm import length_batches
    from tuneforge.training.estimate import matmul_flops_per_s

    shared = len(os.path.commonprefix(prompts)) if len(prompts) > 1 else 0
    lengths = [len(p) + 1 for p in prompts]  # the prompt and its label word, as the evaluator cuts its batches
    positions = sum((max(lengths[i] for i in batch) - shared) * len(batch)
                    for batch in length_batches(lengths, batch_size, tokens))
    head = model.get_output_embeddings()
    per_position = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    flops = per_position * positions + 2 * head.weight.numel() * len(prompts)
    device = next(model.parameters()).device
    return {"positions": positions, "flops": flops, "rate": matmul_flops_per_s(device, dtype=dtype)}


def child(side: str, batch_size: int, batch_tokens: int | None) -> dict:
    import torch

    from tuneforge.data import word_ids

    cfg, tokenizer, data = held_out(batch_size, "bf16" if side == "bf16" else "auto", batch_tokens)
    items = data.eval_items
    gold = torch.tensor([it.label for it in items])
    answers = [word_ids(tokenizer, w, cfg.data.chat_template) for w in data.label_words]
    if side == "reference":
        import peft
        from transformers import AutoModelForCausalLM

        from tuneforge.io.load import resolve_spec

        model = AutoModelForCausalLM.from_pretrained(resolve_spec(cfg.model), dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **LORA)).eval()
        start = time.perf_counter()
        predicted = reference_predictions(model, tokenizer.pad_token_id, [it.prompt_ids for it in items], answers)
        seconds = time.perf_counter() - start
        accuracy = (torch.tensor(predicted) == gold).float().mean().item()
    else:
        from tuneforge.eval.evaluator import make_evaluator
        from tuneforge.io.load import load_model
        from tuneforge.methods import lora
        from tuneforge.training.precision import hold_frozen_linears

        model, _ = load_model(cfg.model, dtype="float32", device="cpu")
        lora.inject(model, lora.Config(lora_dropout=0.0, **LORA))
        hold_frozen_linears(model, cfg.train.precision, torch.device("cpu"))  # as a run holds them (bf16 only)
        start = time.perf_counter()
        if side in ("tuneforge", "bf16"):  # bf16: the evaluator under the run's bf16 autocast
            accuracy = make_evaluator(tokenizer, data, cfg).run(model)["accuracy"]
        else:
            scores = _before_classify().score_labels(model, [it.prompt_ids for it in items], answers, 8,
                                                     tokenizer.pad_token_id)
            accuracy = (scores.argmax(1) == gold).float().mean().item()
        seconds = time.perf_counter() - start
    # tuneforge's matmul work and the matmul rate, measured after the timing
    dtype = {"tuneforge": torch.float32, "bf16": torch.bfloat16}.get(side)
    tokens = cfg.eval_batch_tokens  # as the evaluator cuts its batches
    floor = matmul_floor(model, [it.prompt_ids for it in items], batch_size, tokens, dtype) if dtype else {}
    return {"n": len(items), "seconds": seconds, "accuracy": accuracy, "peak_rss_mb": rss_mb(), **floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="tuneforge's eval.batch_size")
    parser.add_argument("--batch-tokens", type=int, help="tuneforge's eval.batch_tokens (default: its own)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", choices=SIDES)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.batch_size, args.batch_tokens)))
        return

    import statistics

    from bench.report import machine, write_section

    runs = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            tokens = [] if args.batch_tokens is None else ["--batch-tokens", str(args.batch_tokens)]
            r = spawn(__file__, ["--child", side, "--batch-size", str(args.batch_size), *tokens], REPO)
            if "error" in r:
                sys.exit(f"{side}: {r['error']}")
            runs[side].append(r)
            print(f"{side:>9}: {r['n']} in {r['seconds']:.1f} s ({r['n'] / r['seconds']:.1f}/s), accuracy "
                  f"{r['accuracy']:.6f}, peak {r['peak_rss_mb']:.0f} MB", flush=True)
    seconds = {side: statistics.median(r["seconds"] for r in rs) for side, rs in runs.items()}
    first = {side: rs[0] for side, rs in runs.items()}
    n = first["tuneforge"]["n"]
    # the same labels right: the accuracies' counts (each side's own division may differ in its last bit)
    correct = {side: round(r["accuracy"] * n) for side, r in first.items()}
    same = correct["tuneforge"] == correct["before"]
    work = first["tuneforge"]
    floor = work["flops"] / work["rate"]
    print(f"matmul floor: {work['flops'] / 1e9:.0f} GFLOP over {work['positions']} positions at "
          f"{work['rate'] / 1e9:.0f} GFLOP/s = {floor:.1f} s; tuneforge at {floor / seconds['tuneforge']:.0%} of "
          f"the rate; at most {seconds['before'] / floor:.1f}x quicker than {BEFORE}")
    rows = "\n".join(f"| {name} | {seconds[side]:.1f} | {n / seconds[side]:.1f} | "
                     f"{seconds[side] / seconds['tuneforge']:.2f}x | {first[side]['accuracy']:.4%} | "
                     f"{first[side]['peak_rss_mb']:.0f} |"
                     for side, name in (("tuneforge", "tuneforge"), ("before", f"tuneforge at {BEFORE}"),
                                        ("reference", "Transformers + PEFT, batches of 8"),
                                        ("bf16", "tuneforge, train.precision bf16")))
    from tuneforge.core import config

    tokens = config.from_yaml(CONFIG, [f"eval.batch_size={args.batch_size}",
                                       f"eval.batch_tokens={args.batch_tokens or 'null'}"]).eval_batch_tokens
    budget = (f"eval.batch_tokens {args.batch_tokens}" if args.batch_tokens else
              f"eval.batch_size {args.batch_size} and eval.batch_tokens at its default (batch_size x data.max_length)")
    half = first["bf16"]
    half_floor = half["flops"] / half["rate"]
    write_section("evaluation", f"""
## Held-out evaluation: {n} sentiment snippets scored by label word

`python bench/evaluation.py --rounds {args.rounds}` on {machine()}. The default model with LoRA r=16 on all
linear layers, unmerged, labels the sentiment recipe's whole held-out split by each label word's
log-likelihood after the prompt. Each side in its own process, the sides taking turns; the median of
{args.rounds} round(s). tuneforge with {budget}:
the prompts' shared beginning (the chat template's system turn and the question) runs once for the set,
each batch holds prompts of similar length, as many as fit in {tokens:,} positions (that beginning included),
and the head sees only each prompt's last position. tuneforge at {BEFORE} ran the shared beginning once per
batch of 8 prompts. The same number labelled right as at {BEFORE}: {'yes' if same else 'NO'}
({correct['tuneforge']} and {correct['before']} of {n}; the reference {correct['reference']}).

The matmul work alone sets a floor: tuneforge's linear layers over the {work['positions']:,} positions it
computes (each prompt and its label word, padded within a batch, past the shared beginning) and the head
over one position per prompt, {work['flops'] / 1e9:,.0f} GFLOP, take {floor:.1f} s at the fp32 matmul rate
measured as tuneforge's side started ({work['rate'] / 1e9:.0f} GFLOP/s, 1024 x 1024). tuneforge runs at
{floor / seconds['tuneforge']:.0%} of that rate. Nothing that computes these positions in fp32 can be more than
{seconds['before'] / floor:.1f}x quicker than tuneforge at {BEFORE} ({seconds['before']:.1f} s).

In bf16 (`train.precision: bf16`: the evaluator under the run's autocast, the frozen linear layers held in
bf16 as a run holds them) the same matmuls take {half_floor:.1f} s at the bf16 rate
({half['rate'] / 1e9:.0f} GFLOP/s), and the evaluation takes {seconds['bf16']:.1f} s,
{seconds['before'] / seconds['bf16']:.2f}x quicker than {BEFORE}. It labels {correct['bf16']} right,
against {correct['tuneforge']} in fp32: the rounding moves the answers of the closest snippets.

| evaluator | seconds | examples/s | time against tuneforge | accuracy | peak RSS (MB) |
|---|---|---|---|---|---|
{rows}
""")


if __name__ == "__main__":
    main()
