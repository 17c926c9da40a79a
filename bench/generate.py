"""Greedy generation speed: the base model, a LoRA adapter on it (unmerged), and the same adapter merged.

The default model, LoRA r=16 on all linear layers with B drawn at random (a trained-looking adapter,
so the unmerged path does its full work), greedy decoding of 64 new tokens after each of a few chat
prompts, with the KV cache. The three models take turns, round after round, in one process; each
figure is the median over rounds of tokens per second. The merged model must give the unmerged one's
tokens (checked).

    python bench/generate.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["Write a short poem about the sea.", "Explain what a neural network is in two sentences.",
           "List three things to pack for a day of hiking."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    from bench.report import machine, write_section
    from tuneforge.eval.generate import encode_prompt
    from tuneforge.io.load import load_model
    from tuneforge.methods import lora

    base, tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu")
    unmerged = copy.deepcopy(base)
    handle = lora.inject(unmerged, lora.Config(r=16, lora_alpha=32, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.layers(unmerged).values():
            layer.lora_B.weight.copy_(0.02 * torch.randn(layer.lora_B.weight.shape, generator=gen))
    merged = copy.deepcopy(unmerged)
    handle.merge(merged)
    models = {"base": base, "LoRA, unmerged": unmerged.eval(), "LoRA, merged": merged.eval()}
    inputs = [encode_prompt(tokenizer, p) for p in PROMPTS]

    def run(model) -> tuple[float, list]:
        tokens, outputs, start = 0, [], time.perf_counter()
        with torch.no_grad():
            for x in inputs:
                out = model.generate(**x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False, temperature=None, top_p=None, top_k=None,
                                     pad_token_id=tokenizer.pad_token_id)
                tokens += out.shape[1] - x["input_ids"].shape[1]
                outputs.append(out)
        return tokens / (time.perf_counter() - start), outputs

    rates = {name: [] for name in models}
    outputs = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            rate, outputs[name] = run(model)
            rates[name].append(rate)
    same = all(torch.equal(a, b) for a, b in zip(outputs["LoRA, merged"], outputs["LoRA, unmerged"]))
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in median.items():
        print(f"{name:>15}: {r:.1f} tokens/s ({r / median['base']:.2f}x the base)")
    rows = "\n".join(f"| {name} | {r:.1f} | {r / median['base']:.2f}x |" for name, r in median.items())
    write_section("generate", f"""
## Greedy generation: the base model, LoRA unmerged and merged

`python bench/generate.py` on {machine()}: the default model, {args.new_tokens} new tokens after each of
{len(PROMPTS)} chat prompts, KV cache on, one thread pool; medians of {args.rounds} rounds in which the three
take turns. LoRA r=16 on all linear layers, B random. The merged model gave the unmerged one's tokens:
{"yes" if same else "NO"}.

| model | tokens/s | against the base |
|---|---|---|
{rows}
""")


if __name__ == "__main__":
    main()
