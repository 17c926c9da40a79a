"""QLoRA on a tiny llama: NF4 targets under LoRA, identity at the start, no float copy of the
quantized weights, save/load through load_adapter (which quantizes the base), merge into a plain
transformers model, training, PEFT reading the adapter onto a dequantized base, and memory figures."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tuneforge.model import targets
from tuneforge.core.config import TrainCfg, from_dict
from tuneforge.core.errors import UserError
from tuneforge.eval.lm import evaluate_lm
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import lora, qlora
from tuneforge.quant.nf4 import NF4Linear, dequantize_nf4, quantize_linears_, quantize_nf4
from tuneforge.training.loop import train

from conftest import make_tiny_model
from test_lora import randomize, rel_err
from test_train import VOCAB, collate, synthetic_examples

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


@pytest.fixture
def ids(tiny):
    return torch.randint(0, len(tiny[1]), (2, 11), generator=torch.Generator().manual_seed(0))


def test_config_is_lora_config_plus_quantization():
    ours, theirs = dataclasses.fields(qlora.Config), dataclasses.fields(lora.Config)
    assert [f.name for f in ours] == [f.name for f in theirs] + ["block_size", "double_quant", "compute_dtype"]
    assert qlora.Config().lora() == lora.Config()
    assert (qlora.Config().block_size, qlora.Config().double_quant, qlora.Config().compute_dtype) == (64, True, "auto")
    assert qlora.Config(target_modules=["all-linear"]).target_modules == "all-linear"  # LoRA's __post_init__ runs
    with pytest.raises(UserError, match="block_size"):
        qlora.Config(block_size=63)
    run = from_dict({"method": {"name": "qlora", "r": 4, "block_size": 32, "double_quant": False}})
    assert run.method.args["block_size"] == 32 and run.method.args["lora_alpha"] == 16


def test_identity_right_after_inject(tiny, ids, capsys):
    model, _ = tiny
    quantized = make_tiny_model(model.config.vocab_size)
    quantize_linears_(quantized, targets.find(quantized, TARGETS))
    qlora.inject(model, qlora.Config(target_modules=TARGETS))
    assert torch.equal(model(ids).logits, quantized(ids).logits)  # B = 0
    assert "MiB ->" in capsys.readouterr().err


def test_trainable_is_only_lora(tiny):
    model, _ = tiny
    params = qlora.inject(model, qlora.Config(r=4, target_modules="all-linear")).trainable(model)
    assert {id(p) for p in params.values()} == {id(p) for p in model.parameters() if p.requires_grad}
    layers = lora.layers(model).values()
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert sum(p.numel() for p in params.values()) == sum(4 * (l.base_layer.in_features + l.base_layer.out_features)
                                                         for l in layers)
    assert all(p.dtype == torch.float32 for p in params.values())


def test_no_float_copy_of_quantized_weights(tiny):
    model, _ = tiny
    qlora.inject(model, qlora.Config(target_modules="all-linear"))
    for layer in lora.layers(model).values():
        base = layer.base_layer
        assert isinstance(base, NF4Linear) and not hasattr(base, "weight")
        tensors = dict([*base.named_parameters(), *base.named_buffers()])
        assert set(tensors) == {"packed", "absmax", "absmax_scale", "absmax_offset"}  # llama has no biases
        assert tensors["packed"].dtype == torch.uint8 and tensors["absmax"].dtype == torch.uint8  # double quant
        assert tensors["packed"].numel() == base.in_features * base.out_features // 2
        assert all(t.numel() <= 1 for t in (tensors["absmax_scale"], tensors["absmax_offset"]))


def test_quantized_logits_close_to_base(tiny, ids):
    model, _ = tiny
    base = model(ids).logits
    qlora.inject(model, qlora.Config(target_modules="all-linear"))
    err = rel_err(model(ids).logits, base)
    print(f"tiny model, all-linear NF4: relative logit error {err:.4f}")
    assert 0 < err < 0.2  # every layer adds its ~9% weight error; a random model has no slack to absorb it



@pytest.mark.parametrize(("loaded", "compute"), [(torch.bfloat16, "auto"), (torch.float32, "bf16")])
def test_one_compute_dtype_for_the_unquantized_tensors(tiny, ids, loaded, compute):
    model = tiny[0].to(loaded)
    handle = qlora.inject(model, qlora.Config(target_modules="all-linear", compute_dtype=compute))
    dtype = torch.float32 if compute == "auto" else torch.bfloat16  # auto on a CPU: fp32
    assert model.model.norm.weight.dtype == model.lm_head.weight.dtype == dtype
    assert all(l.base_layer.compute_dtype == dtype for l in lora.layers(model).values())
    assert all(p.dtype == torch.float32 for p in handle.trainable(model).values())
    randomize(model)
    model(ids).logits.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.trainable(model).values())
    with pytest.warns(UserWarning):
        handle.merge(model)
    assert model(ids).logits.dtype == dtype


def test_save_then_load_is_bit_exact(tiny, tmp_path, ids):
    model, _ = tiny
    handle = qlora.inject(model, qlora.Config(r=4, target_modules=TARGETS, use_rslora=True))
    randomize(model)
    save_adapter(model, handle, tmp_path / "a", base_model_name="tiny")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] and "block_size" not in config
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["tuneforge"])["method"] == "qlora"
    fresh = make_tiny_model(model.config.vocab_size)
    loaded = load_adapter(fresh, tmp_path / "a")  # full precision: quantized here
    assert loaded.method is qlora and loaded.cfg == dataclasses.replace(handle.cfg, target_modules=sorted(TARGETS))
    assert all(isinstance(l.base_layer, NF4Linear) for l in lora.layers(fresh).values())
    saved, again = handle.state_dict(model), loaded.state_dict(fresh)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_merged_equals_unmerged_and_is_a_plain_model(tiny, tmp_path, ids):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    handle = qlora.inject(model, qlora.Config(r=4, target_modules="all-linear"))
    randomize(model)
    unmerged = model(ids).logits
    with pytest.warns(UserWarning, match="4-bit"):
        handle.merge(model)
    assert not any(isinstance(m, (NF4Linear, lora.LoRALinear)) for m in model.modules())
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    merged = model(ids).logits
    assert rel_err(merged, unmerged) <= 1e-5
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(reloaded(ids).logits, merged)
    prompt = tok("ab", return_tensors="pt")
    out = reloaded.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = prompt.input_ids
    with torch.no_grad():  # greedy decoding of the merged model, token by token, without a cache
        for _ in range(4):
            step = reloaded(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, step], dim=1)
    assert torch.equal(out, expected)


def test_training_lowers_the_loss(tmp_path):
    model = make_tiny_model(VOCAB, seed=1)
    handle = qlora.inject(model, qlora.Config(r=8, target_modules="all-linear"))
    rows = synthetic_examples(16)
    before = evaluate_lm(model, rows, collate)["loss"]
    train(model, handle.trainable(model), rows, collate, TrainCfg(batch_size=8, max_steps=6, learning_rate=2e-2),
          tmp_path, progress=False)
    after = evaluate_lm(model, rows, collate)["loss"]
    print(f"qlora training loss {before:.3f} -> {after:.3f}")
    assert after < before * 0.9


def test_peft_loads_it_onto_the_dequantized_base(tiny, tmp_path, ids):
    peft = pytest.importorskip("peft")
    model, _ = tiny
    handle = qlora.inject(model, qlora.Config(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize(model)
    expected = model(ids).logits
    save_adapter(model, handle, tmp_path / "a")
    dense = make_tiny_model(model.config.vocab_size)
    with torch.no_grad():
        for name in targets.find(dense, TARGETS):
            weight = dense.get_submodule(name).weight
            weight.copy_(dequantize_nf4(quantize_nf4(weight, 64, double_quant=True)))
    theirs = peft.PeftModel.from_pretrained(dense, tmp_path / "a").eval()
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_memory_report(tiny):
    model, _ = tiny
    dense = qlora.memory_report(model)
    assert dense["quantized_bytes"] == 0 and dense["bits_per_weight"] is None
    handle = qlora.inject(model, qlora.Config(r=4, target_modules="all-linear"))
    report = qlora.memory_report(model)
    linear = [l.base_layer for l in lora.layers(model).values()]
    assert report["quantized_layers"] == len(linear)
    assert report["quantized_weights"] == sum(m.in_features * m.out_features for m in linear)
    assert report["quantized_bytes"] == sum(m.state.nbytes for m in linear)
    assert report["dense_bytes"] == 4 * report["quantized_weights"]
    # the tiny layers (64 x 32 and up) pay a whole fp32 scale and offset each: a little above 4.127
    assert 4.12 < report["bits_per_weight"] < 4.2
    assert report["unquantized_bytes"] == dense["total_bytes"] - report["dense_bytes"]
    assert report["adapter_bytes"] == 4 * sum(p.numel() for p in handle.trainable(model).values())


def test_second_inject_raises_before_quantizing(tiny):
    model, _ = tiny
    lora.inject(model, lora.Config())
    with pytest.raises(RuntimeError, match="already injected"):
        qlora.inject(model, qlora.Config(target_modules="all-linear"))
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    other = make_tiny_model(model.config.vocab_size)
    with pytest.raises(UserError, match="q_proj"):
        qlora.inject(other, qlora.Config(target_modules=["q_prj"]))
    assert not any(isinstance(m, NF4Linear) for m in other.modules())
    qlora.inject(other, qlora.Config())  # nothing changed: it can be retried


@pytest.mark.real
def test_real_model_all_linear(capsys):
    from tuneforge.io.load import load_model

    model, tok = load_model("smollm2-135m", device="cpu")  # a fresh copy: real_model stays untouched
    before = qlora.memory_report(model)["total_bytes"]
    qlora.inject(model, qlora.Config(target_modules="all-linear"))
    report = qlora.memory_report(model)
    base_after = report["total_bytes"] - report["adapter_bytes"]
    print(f"\nsmollm2-135m all-linear NF4: {report['bits_per_weight']:.4f} bits per weight over "
          f"{report['quantized_layers']} layers; model {before / 2**20:.1f} MiB -> {base_after / 2**20:.1f} MiB "
          f"(quantized layers {report['dense_bytes'] / 2**20:.1f} -> {report['quantized_bytes'] / 2**20:.1f} MiB, "
          f"unquantized {report['unquantized_bytes'] / 2**20:.1f} MiB, LoRA {report['adapter_bytes'] / 2**20:.1f} MiB)")
    assert report["bits_per_weight"] == pytest.approx(4.127, abs=2e-3)
    assert base_after < before
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"generated: {text!r}")
    assert out.shape[1] > prompt["input_ids"].shape[1] and text.strip()
