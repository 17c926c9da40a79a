"""Bottleneck adapters on a tiny llama: identity at the start, placements, parameter counts,
save/load, training, generation, and a merge that refuses with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tuneforge.core.config import TrainCfg
from tuneforge.core.errors import UserError
from tuneforge.eval.lm import evaluate_lm
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import adapter
from tuneforge.methods.adapter import AdaptedOutput, Config
from tuneforge.training.loop import train

from conftest import make_tiny_model
from test_train import VOCAB, collate, synthetic_examples


def randomize(model: nn.Module, handle, seed: int = 1) -> None:
    """Move every adapter (and trained norm) away from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture
def ids(tiny):
    return torch.randint(0, len(tiny[1]), (2, 11), generator=torch.Generator().manual_seed(0))


def test_module_equals_reference():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = AdaptedOutput(base, 12, 3, Config(non_linearity="tanh"))
    nn.init.normal_(layer.adapter.up.weight)
    x = torch.randn(4, 16)
    h = base(x)
    down, up = layer.adapter.down, layer.adapter.up
    expected = h + torch.tanh(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_identity_right_after_inject(tiny, ids, placement):
    model, _ = tiny
    before = model(ids).logits
    adapter.inject(model, Config(placement=placement, train_norms=True))
    assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("placement,wrapped", [("pfeiffer", {"mlp.down_proj"}),
                                               ("houlsby", {"mlp.down_proj", "self_attn.o_proj"})])
def test_placements_insert_the_right_modules(tiny, placement, wrapped):
    model, _ = tiny
    adapter.inject(model, Config(placement=placement))
    layers = adapter.layers(model)
    assert len(layers) == len(wrapped) * model.config.num_hidden_layers
    assert {path.split(".", 3)[3] for path in layers} == wrapped  # model.layers.<i>.<wrapped>


@pytest.mark.parametrize("kw,expected", [
    # hidden 64, bottleneck 64 // 16 = 4: down 64*4 + 4, up 4*64 + 64 = 580 per adapter, 2 blocks
    ({}, 2 * 580),
    ({"placement": "houlsby"}, 4 * 580),
    # bottleneck 8: down 64*8 + 8, up 8*64 + 64 = 1096; norms: 2 per block and the final one, 64 each
    ({"bottleneck_size": 8, "train_norms": True}, 2 * 1096 + 5 * 64),
])
def test_trainable_count_and_only_the_adapter(tiny, kw, expected):
    model, _ = tiny
    params = adapter.inject(model, Config(**kw)).trainable(model)
    assert sum(p.numel() for p in params.values()) == expected
    assert {id(p) for p in params.values()} == {id(p) for p in model.parameters() if p.requires_grad}


def test_save_then_load_is_bit_exact(tiny, tmp_path, ids):
    model, _ = tiny
    handle = adapter.inject(model, Config(placement="houlsby", non_linearity="gelu", train_norms=True))
    randomize(model, handle)
    save_adapter(model, handle, tmp_path / "a", base_model_name="tiny")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] is None and config["method"] == "adapter" and config["placement"] == "houlsby"
    fresh = make_tiny_model(model.config.vocab_size)
    loaded = load_adapter(fresh, tmp_path / "a")
    assert loaded.cfg == handle.cfg
    saved, again = handle.state_dict(model), loaded.state_dict(fresh)
    assert "base_model.model.model.layers.0.mlp.down_proj.adapter.down.weight" in saved
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_changing_the_adapter_changes_the_output(tiny, ids):
    model, _ = tiny
    adapter.inject(model, Config())
    before = model(ids).logits
    with torch.no_grad():
        next(iter(adapter.layers(model).values())).adapter.up.bias.fill_(0.5)
    assert not torch.allclose(model(ids).logits, before)


def test_training_lowers_the_loss(tmp_path):
    model = make_tiny_model(VOCAB, seed=1)
    handle = adapter.inject(model, Config(placement="houlsby", bottleneck_size=16))
    rows = synthetic_examples(16)
    before = evaluate_lm(model, rows, collate)["loss"]
    train(model, handle.trainable(model), rows, collate, TrainCfg(batch_size=8, max_steps=20, learning_rate=1e-2),
          tmp_path, progress=False)
    assert evaluate_lm(model, rows, collate)["loss"] < before - 0.1  # 3.71 -> 3.57 measured


def test_generation_is_greedy_decoding_of_the_adapted_model(tiny, ids):
    """generate (with its KV cache) picks, token by token, the argmax of the adapted model run on the
    whole sequence so far without a cache."""
    model, tok = tiny
    randomize(model, adapter.inject(model, Config(placement="houlsby")))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    expected = ids
    for _ in range(3):
        logits = model(expected, use_cache=False).logits[:, -1]
        expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_merge_raises(tiny):
    model, _ = tiny
    handle = adapter.inject(model, Config())
    with pytest.raises(UserError, match="nonlinearity.*cannot be folded"):
        handle.merge(model)


def test_errors(tiny):
    model, _ = tiny
    with pytest.raises(UserError, match="o_proj"):
        adapter.inject(model, Config(placement="houlsby", attn_output_modules=["out_proj"]))
    assert not adapter.layers(model)  # nothing changed: it can be retried
    with pytest.raises(UserError, match="block 0 .* has 2 modules"):
        adapter.inject(model, Config(mlp_output_modules=["down_proj", "up_proj"]))
    with pytest.raises(UserError, match="dropout"):
        Config(dropout=1.0)
    handle = adapter.inject(model, Config())
    sd = handle.state_dict(model)
    key = next(iter(sd))
    with pytest.raises(UserError, match="shape"):
        handle.load_state_dict(model, {**sd, key: torch.zeros(3, 3)})
    with pytest.raises(UserError, match="missing"):
        handle.load_state_dict(model, {k: v for k, v in sd.items() if k != key})
