"""Packed rows against padded length-grouped batches: the instruction recipe (configs/instructions-lora.yaml,
the Self-Instruct seed tasks on the default model, LoRA r=16 on all linear layers, batch 4, rows of 256).

- padded: batches of 4 examples of similar length (``data.group_by_length``, what the recipe ships with);
- packed: batches of 4 rows, each holding as many examples as fit in 256 tokens (``data.packing``), each
  example attending only to itself.

Each side is a ``tuneforge train`` process of its own (so its peak RSS is its own), the two alternating
``--repeats`` times, ``--steps`` steps each. Tokens/s counts the examples' tokens (padding excluded) over
the steps after the first, from metrics.jsonl; "works": every step's gradient norm finite and above zero,
and the loss figures. The padded and packed positions of an epoch come from the packed run's summary.

    python bench/packing.py [--steps 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "instructions-lora.yaml"
SIDES = {"padded, length-grouped": ["data.packing=false", "data.group_by_length=true"],
         "packed": ["data.packing=true"]}


def run(side: str, steps: int, root: Path, device: str) -> dict:
    out = root / f"run{len(list(root.iterdir()))}"
    sets = [*SIDES[side], f"train.max_steps={steps}", f"train.output_dir={out}", "train.logging_steps=1",
            "train.eval_at_start=false", "train.save_steps=0", "data.max_eval_examples=8",
            "train.lr_schedule=constant", f"train.device={device}"]
    command = [sys.executable, "-m", "tuneforge", "train", str(CONFIG), *[a for s in sets for a in ("--set", s)]]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    times = [b["seconds"] - a["seconds"] for a, b in zip(records, records[1:])]  # the first step warms up
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(records, records[1:])]
    summary = json.loads((out / "summary.json").read_text())
    norms = [r["grad_norm"] for r in records]
    result = {"step_s": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
              "tokens_per_step": sum(tokens) / len(tokens), "peak_mb": summary["peak_memory_mb"],
              "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
              "works": all(n is not None and math.isfinite(n) and n > 0 for n in norms),
              "packing": summary.get("packing")}
    print(f"{side}: {result['step_s']:.2f} s/step, {result['tokens_per_s']:.0f} tokens/s, peak "
          f"{result['peak_mb']:.0f} MB, loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}, "
          f"gradients {'non-zero' if result['works'] else 'ZERO OR NOT FINITE'}", file=sys.stderr)
    return result


def shuffled_padding(device: str) -> int:
    """The padding positions of an epoch of the recipe's data in plain shuffled batches (no grouping, no packing)."""
    from tuneforge.core import config
    from tuneforge.data import load_datasets
    from tuneforge.data.collate import padded_positions
    from tuneforge.io.load import load_tokenizer
    from tuneforge.training.run import batch_order

    cfg = config.from_yaml(CONFIG, ["data.packing=false", "data.group_by_length=false", f"train.device={device}"])
    data = load_datasets(cfg.data, load_tokenizer(cfg.model), seed=cfg.train.seed)
    return padded_positions([len(e.input_ids) for e in data.train], batch_order(cfg, data)(0))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from bench.report import machine, write_section

    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for side in SIDES:
                runs[side].append(run(side, args.steps, Path(tmp), args.device))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "tokens_per_s", "tokens_per_step",
                                                                   "peak_mb")} for side, rs in runs.items()}
    padded, packed = med["padded, length-grouped"], med["packed"]
    report = runs["packed"][0]["packing"]
    tokens = report["tokens"]
    shuffled = shuffled_padding(args.device)

    def row(side: str) -> str:
        m, rs = med[side], runs[side]
        works = "yes" if all(r["works"] for r in rs) else "NO"
        losses = ", ".join(f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" for r in rs)
        return (f"| {side} | {m['step_s']:.2f} | {m['tokens_per_step']:.0f} | {m['tokens_per_s']:.0f} | "
                f"{m['tokens_per_s'] / padded['tokens_per_s']:.2f}x | {m['peak_mb']:.0f} | "
                f"{m['peak_mb'] / padded['peak_mb']:.2f}x | {tokens / m['tokens_per_s'] / 60:.1f} | {losses} | "
                f"{works} |")

    command = "python bench/packing.py" + "".join(f" --{k} {v}" for k, v in (("steps", args.steps),
                                                                          ("repeats", args.repeats),
                                                                          ("device", args.device))
                                                  if v != parser.get_default(k))
    body = "\n".join([
        "## Packed rows against padded length-grouped batches (instruction tuning)",
        "",
        f"`{command}` on {machine()}: configs/instructions-lora.yaml (the default model, LoRA r=16 on all "
        f"linear layers, the Self-Instruct seed tasks, rows of at most 256 tokens), batches of 4 examples padded "
        f"against batches of 4 packed rows, {args.steps} steps each, each run in its own process, the two "
        f"alternating ({args.repeats} of each; medians). Tokens are the examples' own, padding excluded, over "
        "the steps after the first. \"works\": every step's gradient norm is finite and above zero.",
        "",
        "| batches | s/step | tokens/step | tokens/s | speed | peak RSS (MB) | memory | minutes an epoch "
        "at that rate | loss, first step -> last | works |",
        "|---|---|---|---|---|---|---|---|---|---|",
        row("padded, length-grouped"),
        row("packed"),
        "",
        f"An epoch of the {report['examples']} training examples ({tokens:,} tokens): "
        f"{report['batches_unpacked']} padded batches holding {report['padding_unpacked']:,} padding positions, "
        f"against {report['rows']} packed rows in {report['batches']} batches holding {report['padding_packed']:,} "
        f"(batches of 4 examples in random order, neither grouped nor packed, would hold {shuffled:,}). "
        f"Packed, {packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x the tokens per second for "
        f"{packed['peak_mb'] / padded['peak_mb']:.2f}x the memory. The losses of the two sides are of other "
        f"batches (a packed step holds {packed['tokens_per_step'] / padded['tokens_per_step']:.1f}x the tokens), "
        "so they are shown, not compared.",
    ])
    write_section("packing", body)
    print(body)


if __name__ == "__main__":
    main()
