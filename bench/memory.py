"""Where a training step's memory goes, by kind: measured on the default model for the longest batch of
a run config (by default the LoRA sentiment recipe's).

One process loads the model, injects the method, and runs one training step on the batch the run's
batch order puts first (the longest). It records the process's resident memory once the weights are
read, what autograd saves for backward during the forward (every saved tensor once, by the module that
saved it, the weights' own views left out), the trainable state, and the peak; what the peak holds
beyond those is the backward's transient tensors and what the allocator keeps. The figures go into
docs/memory.md, beside tuneforge's estimate for the same batch.

The peak moves between processes of the same step by hundreds of MB (the share of freed memory the
allocator keeps, in huge pages, differs from run to run), so the step runs in ``--runs`` processes of its
own, and the table gives each part's median and the peak's range.

    python bench/memory.py                        # configs/sentiment-lora.yaml
    python bench/memory.py configs/demo-lora.yaml --set method.lora_dropout=0
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "sentiment-lora.yaml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--runs", type=int, default=5, help="processes, each measuring the step once")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.config, args.set)))
        return

    from bench.report import write_section

    sets = [f"--set={item}" for item in args.set]
    runs = [json.loads(subprocess.run([sys.executable, __file__, args.config, *sets, "--one"], check=True,
                                      capture_output=True, text=True).stdout.splitlines()[-1])
            for _ in range(args.runs)]
    first = runs[0]
    parts = {what: statistics.median(r["parts"][what] for r in runs) for what in first["parts"]}
    peaks = sorted(r["peak"] for r in runs)
    table = "\n".join(f"| {what} | {mb:.0f} |" for what, mb in parts.items())
    print(table)
    print("peak RSS, each run:", ", ".join(f"{p:.0f}" for p in peaks))
    mib = 2**20
    shown = " ".join(a for a in sys.argv[1:] if a != "--one")
    write_section("memory", f"""
`python bench/memory.py {shown}`: one training step of `{Path(args.config).name}` on its longest batch
({first["shape"]} tokens, {first["shared"]} token positions saved by the shared prefix), in each of {len(runs)}
processes; each part is the median over them.

| part | MB |
|---|---|
{table}
| **peak RSS**, median (lowest to highest) | **{statistics.median(peaks):.0f}** ({peaks[0]:.0f} to {peaks[-1]:.0f}) |

tuneforge's estimate for the same batch: {first["estimate"] / mib:.0f} MB
({", ".join(f"{k.replace('_', ' ')} {v / mib:.0f}" for k, v in first["estimate_parts"].items())}).
""", path=REPO / "docs" / "memory.md")


def measure(config_path: str, overrides: list[str]) -> dict:
    """One training step on the config's longest batch, in this process: each part's MB, the peak RSS, the
    batch, and the estimate for it."""
    from tuneforge.core import config
    from tuneforge.data import Collator, load_datasets
    from tuneforge.eval.lm import label_loss
    from tuneforge.io.load import load_model
    from tuneforge.model.kernels import use_lean_modules
    from tuneforge.methods.registry import get_method
    from tuneforge.training.optim import make_optimizer
    from tuneforge.training.run import batch_order, run_estimate

    cfg = config.from_yaml(config_path, overrides)
    model, tokenizer = load_model(cfg.model, dtype="float32", device="cpu")
    data = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    est = run_estimate(cfg, data, tokenizer, model.config)
    handle = get_method(cfg.method.name).inject(model, config.method_config(cfg))
    use_lean_modules(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2]]), use_cache=False)  # every weight read once
    loaded = rss_mb()
    params = handle.trainable(model)
    optimizer = make_optimizer(params, cfg.train.learning_rate, 0.0)
    batch = Collator(tokenizer.pad_token_id)([data.train[i] for i in batch_order(cfg, data)(0)[0]])

    owner: list[str] = []
    for _, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, a: owner.append(type(m).__name__))
        module.register_forward_hook(lambda m, a, o: (owner.pop(), None)[1])
    weights = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()}
    seen, kinds = set(), collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in weights and key not in seen:
            seen.add(key)
            kinds[owner[-1] if owner else "the loss"] += t.untyped_storage().nbytes()
        return t

    model.train()
    stats = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = label_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], stats)
    (loss / n).backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    saved = sum(kinds.values()) / 2**20
    state = 12 * sum(p.numel() for p in params.values()) / 2**20
    mib = 2**20
    rows = [("process, libraries and weights (once read)", loaded), ("trainable state (gradients, AdamW moments)", state),
            *((f"saved for backward: {kind}", b / mib) for kind, b in kinds.most_common()),
            ("backward's transient tensors and the allocator's share", peak - loaded - state - saved)]
    return {"parts": dict(rows), "peak": peak, "shape": f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]}",
            "shared": stats.get("shared_tokens", 0), "estimate": est.peak_bytes, "estimate_parts": est.parts}


if __name__ == "__main__":
    main()
