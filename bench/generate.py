"""Greedy generation speed: the base model, a LoRA adapter on it (unmerged), and the same adapter merged.

The default model, LoRA r=16 on all linear layers with B drawn at random (a trained-looking adapter,
so the unmerged path does its full work), greedy decoding of 64 new tokens after each of a few chat
prompts, with the KV cache. The models take turns on each prompt, round after round, in one process,
in an order that rotates from round to round; each figure is the median over rounds of tokens per
second. The merged model must give the unmerged one's tokens
(checked). A rank-1 adapter, unmerged, makes the same calls per layer with next to no arithmetic in
them: what keeping an adapter separate costs whatever its rank; the adapter disabled runs the wrappers
alone: what they cost. The reference, Transformers' own model from the same converted folder with the
same adapter in PEFT, unmerged, takes its turns beside them: what the reference's unmerged decoding costs
against its own base, and whether it gives tuneforge's tokens (checked).

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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import peft
    from transformers import AutoModelForCausalLM

    from bench.report import machine, write_section
    from tuneforge.eval.generate import encode_prompt
    from tuneforge.io.load import load_model, resolve_spec
    from tuneforge.methods import lora

    base, tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu")
    unmerged = copy.deepcopy(base)
    handle = lora.inject(unmerged, lora.Config(r=16, lora_alpha=32, target_modules="all-linear"))
    rank1 = copy.deepcopy(base)
    lora.inject(rank1, lora.Config(r=1, lora_alpha=2, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in [*lora.layers(unmerged).values(), *lora.layers(rank1).values()]:
            layer.lora_B.weight.copy_(0.02 * torch.randn(layer.lora_B.weight.shape, generator=gen))
    merged = copy.deepcopy(unmerged)
    handle.merge(merged)
    disabled = copy.deepcopy(unmerged)
    lora.set_enabled(disabled, False)
    reference = AutoModelForCausalLM.from_pretrained(resolve_spec("smollm2-135m"), dtype=torch.float32).eval()
    reference_lora = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(resolve_spec("smollm2-135m"), dtype=torch.float32),
        peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)).eval()
    ours = lora.layers(unmerged)
    copied = 0
    with torch.no_grad():  # the same adapter: tuneforge's A and B into PEFT's layers
        for name, module in reference_lora.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                layer = ours[name.removeprefix("base_model.model.")]
                module.lora_A["default"].weight.copy_(layer.lora_A.weight)
                module.lora_B["default"].weight.copy_(layer.lora_B.weight)
                copied += 1
    assert copied == len(ours), (copied, len(ours))
    models = {"base": base, "LoRA, unmerged": unmerged.eval(), "LoRA, merged": merged.eval(),
              "LoRA r=1, unmerged": rank1.eval(), "LoRA, disabled": disabled.eval(),
              "reference, base": reference, "reference, LoRA unmerged": reference_lora}
    inputs = [encode_prompt(tokenizer, p) for p in PROMPTS]

    def run(model, x) -> tuple[int, float, torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id)
        return out.shape[1] - x["input_ids"].shape[1], time.perf_counter() - start, out

    # Each round, the models take turns on each prompt, in an order that rotates from round to round, so
    # that a drift of the machine's speed within a round falls on every model alike.
    names = list(models)
    rates = {name: [] for name in models}
    outputs = {name: [] for name in models}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        tokens, seconds = dict.fromkeys(names, 0), dict.fromkeys(names, 0.0)
        for x in inputs:
            for name in order:
                n, t, out = run(models[name], x)
                tokens[name] += n
                seconds[name] += t
                if round_ == 0:
                    outputs[name].append(out)
        for name in names:
            rates[name].append(tokens[name] / seconds[name])
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {rates[name][-1]:.1f}" for name in names), flush=True)
    same = all(torch.equal(a, b) for a, b in zip(outputs["LoRA, merged"], outputs["LoRA, unmerged"]))
    as_base = all(torch.equal(a, b) for a, b in zip(outputs["LoRA, disabled"], outputs["base"]))
    as_ours = all(torch.equal(a, b) for a, b in zip(outputs["reference, LoRA unmerged"], outputs["LoRA, unmerged"]))
    # the reference's unmerged adapter against its own base, within each round
    ref_ratio = statistics.median(a / b for a, b in zip(rates["reference, LoRA unmerged"], rates["reference, base"]))
    median = {name: statistics.median(r) for name, r in rates.items()}
    # against the base: the median over rounds of the ratio within a round, so the machine's drift falls on both
    ratio = {name: statistics.median(a / b for a, b in zip(r, rates["base"])) for name, r in rates.items()}
    for name, r in median.items():
        print(f"{name:>24}: {r:.1f} tokens/s ({ratio[name]:.2f}x the base)")
    print(f"the reference's unmerged LoRA: {ref_ratio:.2f}x its own base")
    n_layers = len(lora.layers(unmerged))
    rows = "\n".join(f"| {name} | {r:.1f} | {ratio[name]:.2f}x |" for name, r in median.items())
    write_section("generate", f"""
## Greedy generation: the base model, LoRA unmerged and merged

`python bench/generate.py` on {machine()}: the default model, {args.new_tokens} new tokens after each of
{len(PROMPTS)} chat prompts, KV cache on, one thread pool; medians of {args.rounds} rounds in which the models
take turns on each prompt, in an order that rotates from round to round; against the base, the median over rounds of the ratio within a round. LoRA r=16 on all linear layers, B random. The merged model gave the unmerged one's tokens:
{"yes" if same else "NO"}. The price of keeping an adapter separate, in three steps: the disabled adapter
runs each of the {n_layers} adapted layers through its wrapper to the base layer alone (it gave the base's
tokens: {"yes" if as_base else "NO"}); the rank-1 adapter adds the update's two matrix-vector products with
next to no arithmetic in them (their calls, and reading two small matrices from memory); r=16 adds the
reading and arithmetic of rank 16.

| model | tokens/s | against the base |
|---|---|---|
{rows}

The reference (Transformers' model read from the same converted folder; PEFT holding the same adapter,
unmerged) gave tuneforge's unmerged tokens: {"yes" if as_ours else "NO"}. Its unmerged adapter runs at
{ref_ratio:.2f}x its own base's tokens per second, the median over rounds of the ratio within a round,
where tuneforge's runs at {ratio["LoRA, unmerged"]:.2f}x.
""")


if __name__ == "__main__":
    main()
