"""LoRA, rsLoRA and DoRA on a tiny llama: the math against hand-written references, identity at the
start, merge, save/load, targets, fingerprints, combining and switching adapters."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from tuneforge.core.errors import UserError
from tuneforge.model.fingerprint import fingerprint
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import lora
from tuneforge.methods.lora import Config, LoRALinear

from conftest import make_tiny_model

VARIANTS = {"plain": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Move every adapter away from the identity: random B (and, for DoRA, magnitude)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
            if layer.lora_magnitude_vector is not None:
                m = layer.lora_magnitude_vector
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=gen))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def ids(tiny):
    return torch.randint(0, len(tiny[1]), (2, 11), generator=torch.Generator().manual_seed(0))


def test_layer_equals_reference():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, Config(r=4, lora_alpha=8))
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 16)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + base.bias + (8 / 4) * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_scales():
    assert LoRALinear(nn.Linear(8, 8), Config(r=4, lora_alpha=16)).scale == 4.0
    assert LoRALinear(nn.Linear(8, 8), Config(r=4, lora_alpha=16, use_rslora=True)).scale == 16 / math.sqrt(4)


def test_dora_formula_and_gradient():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, Config(r=4, lora_alpha=8, use_dora=True))
    torch.testing.assert_close(layer.lora_magnitude_vector, base.weight.norm(dim=1))  # ||W0|| rows at init
    nn.init.normal_(layer.lora_B.weight)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(12) + 0.5)
    x = torch.randn(3, 16)
    A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    W = base.weight + 2.0 * B @ A
    expected = (m / W.norm(dim=1).detach()) * (x @ W.T) + base.bias  # the norm is a constant in backward
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (A, B, m))
    ref = torch.autograd.grad(expected.square().sum(), (A, B, m))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_quantized_base(tiny):
    from tuneforge.quant.nf4 import NF4Linear

    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(64, 32))
    layer = LoRALinear(base, Config(r=4, use_dora=True))
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 64)
    W = base.dequantize() + layer.delta()
    expected = (layer.lora_magnitude_vector / W.norm(dim=1)) * (x @ W.T) + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="quantized"):
        layer.merge()


@pytest.mark.parametrize("variant", [*VARIANTS, "all-linear"])
def test_identity_right_after_inject(tiny, ids, variant):
    model, _ = tiny
    before = model(ids).logits
    kw = {"target_modules": "all-linear"} if variant == "all-linear" else VARIANTS[variant]
    lora.inject(model, Config(**kw))
    assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_equals_unmerged(tiny, ids, variant):
    model, _ = tiny
    lora.inject(model, Config(r=4, target_modules="all-linear", **VARIANTS[variant]))
    randomize(model)
    unmerged = model(ids).logits
    layer = next(iter(lora.layers(model).values()))
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    layer.unmerge()  # in place and back
    assert rel_err(layer.base_layer.weight, w0) <= 1e-6
    lora.merge(model)
    assert not lora.layers(model) and type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert rel_err(model(ids).logits, unmerged) <= 1e-5


def test_trainable_is_only_lora(tiny):
    model, _ = tiny
    params = lora.inject(model, Config(r=4, target_modules="all-linear")).trainable(model)
    assert {id(p) for p in params.values()} == {id(p) for p in model.parameters() if p.requires_grad}
    expected = sum(4 * (m.in_features + m.out_features) for m in (l.base_layer for l in lora.layers(model).values()))
    assert sum(p.numel() for p in params.values()) == expected
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in params)


@pytest.mark.parametrize("saved", ["norm", "lm_head"])  # lm_head is tied to the embeddings here
def test_modules_to_save_train_and_save(tiny, tmp_path, ids, saved):
    model, _ = tiny
    adapter = lora.inject(model, Config(modules_to_save=[saved]))
    weight = model.get_submodule(saved.replace("norm", "model.norm")).weight
    assert weight.requires_grad and id(weight) in {id(p) for p in adapter.trainable(model).values()}
    with torch.no_grad():
        weight.mul_(1.5)  # the fingerprint leaves out what the adapter itself saves
    randomize(model)
    save_adapter(model, adapter, tmp_path / "a")
    fresh = make_tiny_model(model.config.vocab_size)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh.get_submodule(saved.replace("norm", "model.norm")).weight, weight)
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_unknown_target_lists_close_names(tiny):
    model, _ = tiny
    with pytest.raises(UserError, match="q_proj"):
        lora.inject(model, Config(target_modules=["q_prj"]))
    assert not lora.layers(model) and all(p.requires_grad for p in model.parameters())  # nothing changed
    lora.inject(model, Config(target_modules=["q_proj"]))  # so it can be retried


def test_all_linear_excludes_head(tiny):
    model, _ = tiny
    lora.inject(model, Config(target_modules="all-linear"))
    assert "lm_head" not in lora.layers(model) and isinstance(model.lm_head, nn.Linear)
    assert len(lora.layers(model)) == 7 * model.config.num_hidden_layers


def test_regex_from_config_parser():
    assert Config(target_modules=[r".*\.(q|v)_proj"]).target_modules == r".*\.(q|v)_proj"
    assert Config(target_modules=["all-linear"]).target_modules == "all-linear"
    assert Config(target_modules=["q_proj"]).target_modules == ["q_proj"]
    with pytest.raises(UserError, match="bias"):
        Config(bias="all")


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_then_load_is_bit_exact(tiny, tmp_path, ids, variant):
    model, _ = tiny
    adapter = lora.inject(model, Config(r=4, target_modules=["q_proj", "k_proj", "down_proj"], **VARIANTS[variant]))
    randomize(model)
    save_adapter(model, adapter, tmp_path / "a", base_model_name="tiny")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["down_proj", "k_proj", "q_proj"]
    fresh = make_tiny_model(model.config.vocab_size)
    loaded = load_adapter(fresh, tmp_path / "a")
    assert loaded.cfg == dataclasses.replace(adapter.cfg, target_modules=["down_proj", "k_proj", "q_proj"])
    saved, again = adapter.state_dict(model), loaded.state_dict(fresh)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_load_state_dict_errors_name_the_key(tiny):
    model, _ = tiny
    adapter = lora.inject(model, Config(r=4))
    sd = adapter.state_dict(model)
    key = next(iter(sd))
    with pytest.raises(UserError, match="missing"):
        adapter.load_state_dict(model, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(UserError, match="shape"):
        adapter.load_state_dict(model, {**sd, key: torch.zeros(3, 3)})
    with pytest.raises(UserError, match="unexpected tensor 'x.weight'"):
        adapter.load_state_dict(model, {**sd, "x.weight": torch.zeros(1)})


def test_fingerprint_mismatch_and_force(tiny, tmp_path):
    model, _ = tiny
    adapter = lora.inject(model, Config(use_dora=True))
    randomize(model)
    save_adapter(model, adapter, tmp_path / "a")
    other = make_tiny_model(model.config.vocab_size, seed=1)
    with pytest.raises(UserError, match="made for .* but the model is"):
        load_adapter(other, tmp_path / "a")
    load_adapter(make_tiny_model(model.config.vocab_size, seed=1), tmp_path / "a", force=True)
    assert fingerprint(make_tiny_model(model.config.vocab_size))["sha256"] != fingerprint(other)["sha256"]


def test_bad_files(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(UserError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    adapter = lora.inject(model, Config())
    save_adapter(model, adapter, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        load_adapter(make_tiny_model(model.config.vocab_size), tmp_path / "a")
    save_adapter(model, adapter, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_out": True}))
    with pytest.raises(UserError, match="fan_in_fan_out"):
        load_adapter(make_tiny_model(model.config.vocab_size), tmp_path / "a")
    path.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(make_tiny_model(model.config.vocab_size), tmp_path / "a")


def test_combine_is_the_weighted_sum_of_deltas(tiny, ids):
    vocab = tiny[0].config.vocab_size
    cfg = Config(r=4, use_rslora=True, target_modules="all-linear")
    adapters = []
    for seed in (1, 2):
        model = make_tiny_model(vocab)
        adapter = lora.inject(model, cfg)
        randomize(model, seed)
        adapters.append(model)
    new_cfg, sd = lora.combine([adapter.state_dict(m) for m in adapters], [0.7, -0.4], cfg)
    assert new_cfg.r == 8 and lora.scale(new_cfg) == pytest.approx(lora.scale(cfg))
    combined = make_tiny_model(vocab)
    lora.inject(combined, new_cfg).load_state_dict(combined, sd)
    for path, layer in lora.layers(combined).items():
        expected = 0.7 * lora.layers(adapters[0])[path].delta() - 0.4 * lora.layers(adapters[1])[path].delta()
        torch.testing.assert_close(layer.delta(), expected, rtol=1e-5, atol=1e-7)


def test_set_enabled(tiny, ids):
    model, _ = tiny
    base = model(ids).logits
    lora.inject(model, Config(use_dora=True))
    randomize(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base)
    lora.set_enabled(model, False)
    assert torch.equal(model(ids).logits, base)
    lora.set_enabled(model, True)
    assert torch.equal(model(ids).logits, adapted)


@pytest.mark.real
def test_real_model_merge_and_identity():
    from tuneforge.io.load import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
        lora.inject(model, Config(r=8, target_modules="all-linear", use_dora=True))
        assert torch.equal(model(ids).logits, base)
        randomize(model)
        unmerged = model(ids).logits
        lora.merge(model)
        assert rel_err(model(ids).logits, unmerged) <= 1e-5
