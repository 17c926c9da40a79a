"""LoRA on the experts' 3-D parameters of Mixture-of-Experts models (``target_parameters``), on tiny
random qwen3_moe, mixtral and gpt_oss (whose experts are stored transposed, with biases): identity at
the start, training, save and load, PEFT's keys and files both ways, merging, and what is refused."""

from __future__ import annotations

import json

import pytest
import torch

from families import tiny_model
from tuneforge.core.errors import UserError
from tuneforge.eval.lm import label_loss
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import lora
from tuneforge.core.config.methods import QLoraConfig
from tuneforge.methods.lora import Config, LoRAExperts
from tuneforge.model.families import family_of

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]
E, H, I, R = 4, 64, 128, 2  # experts, hidden, expert MLP width, rank: tests/families.py's tiny MoE models
PREFIX = "base_model.model.model.layers.0.mlp.experts."


def experts_only(name: str, **kw) -> Config:
    """LoRA on the family's expert parameters alone (PEFT's target_modules=[] says the same)."""
    return Config(**{"r": R, "lora_alpha": 4, "target_modules": [],
                     "target_parameters": list(family_of(tiny_model(name)).experts), **kw})


def nudge(params, seed: int) -> None:
    """Random nonzero values for every B, so that the adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in params:
            if "lora_B" in key:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def ids():
    return torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_unchanged_right_after_inject_and_keys_are_peft_s(name, ids):
    base = logits(tiny_model(name), ids)
    model = tiny_model(name)
    handle = lora.inject(model, experts_only(name))
    assert torch.equal(logits(model, ids), base)
    sd = handle.state_dict(model)
    shapes = {k.removeprefix(PREFIX): tuple(v.shape) for k, v in sd.items() if k.startswith(PREFIX)}
    # gate_up_proj (registered first) is wrapped first, so it is the inner wrapper: base_layer.lora_*
    assert shapes == {"base_layer.lora_A.weight": (R * E, H), "base_layer.lora_B.weight": (2 * I, R * E),
                      "lora_A.weight": (R * E, I), "lora_B.weight": (H, R * E)}
    trainable = handle.trainable(model)
    assert len(trainable) == 2 * 2 * 2  # two layers, two parameters, A and B
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable.values()}
    assert all(not torch.equal(p, torch.zeros_like(p)) for k, p in trainable.items() if "lora_A" in k)
    assert all(torch.equal(p, torch.zeros_like(p)) for k, p in trainable.items() if "lora_B" in k)


@pytest.mark.parametrize("name", FAMILIES)
def test_update_is_one_low_rank_product_per_expert(name):
    """delta[e] = s * B_e @ A_e, with A_e rows e*r..(e+1)*r of lora_A and B_e columns e, e+E, ... of lora_B;
    transposed where the experts are stored (E, in, out)."""
    model = tiny_model(name)
    lora.inject(model, experts_only(name))
    nudge(((k, p) for k, p in model.named_parameters() if p.requires_grad), seed=3)
    for wrapper in lora.expert_layers(model).values():
        A, B, s = wrapper.lora_A.weight, wrapper.lora_B.weight, wrapper.scale
        per_expert = torch.stack([s * B[:, e::E] @ A[e * R:(e + 1) * R] for e in range(E)])  # (E, out, in)
        expected = per_expert.transpose(1, 2) if name == "gpt_oss" else per_expert
        assert wrapper.transposed == (name == "gpt_oss")
        torch.testing.assert_close(wrapper.delta(), expected)
        assert wrapper.delta().shape == wrapper.base_weight().shape


@pytest.mark.parametrize("name", FAMILIES)
def test_two_adamw_steps_move_a_and_b_and_nothing_else(name, ids):
    model = tiny_model(name).train()
    handle = lora.inject(model, experts_only(name))
    params = handle.trainable(model)
    start = {k: p.detach().clone() for k, p in params.items()}
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    for _ in range(2):  # B moves on the first step; A on the second, once B is no longer zero
        loss, n = label_loss(model, ids, torch.ones_like(ids), ids)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, start[k]) for k, p in params.items()), "every A and B moved"
    assert all(torch.equal(p, frozen[k]) for k, p in model.named_parameters() if k in frozen)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_then_load_gives_the_same_logits(name, ids, tmp_path):
    model = tiny_model(name)
    handle = lora.inject(model, experts_only(name))
    nudge(handle.trainable(model).items(), seed=1)
    save_adapter(model, handle, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["target_parameters"] == list(family_of(model).experts)
    fresh = tiny_model(name)
    loaded = load_adapter(fresh, tmp_path / "a")
    assert loaded.cfg.target_parameters == list(family_of(model).experts)
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_equals_unmerged_and_is_plain_transformers(name, ids):
    model = tiny_model(name)
    handle = lora.inject(model, experts_only(name, target_modules=["q_proj"]))  # a linear layer beside them
    nudge(handle.trainable(model).items(), seed=2)
    before = logits(model, ids)
    assert not torch.allclose(before, logits(tiny_model(name), ids))
    handle.merge(model)
    assert not any(type(m).__module__.startswith("tuneforge") for m in model.modules())
    assert model.state_dict().keys() == tiny_model(name).state_dict().keys()
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def test_switching_off_gives_the_base(ids):
    model = tiny_model("qwen3_moe")
    handle = lora.inject(model, experts_only("qwen3_moe"))
    nudge(handle.trainable(model).items(), seed=4)
    adapted = logits(model, ids)
    lora.set_enabled(model, False)
    assert torch.equal(logits(model, ids), logits(tiny_model("qwen3_moe"), ids))
    lora.set_enabled(model, True)
    assert torch.equal(logits(model, ids), adapted)


def test_refusals():
    with pytest.raises(UserError, match="method.lora_dropout.*does not apply to target_parameters"):
        Config(lora_dropout=0.1, target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(UserError, match="method.use_dora.*does not apply to target_parameters"):
        Config(use_dora=True, target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(UserError, match="method.target_parameters.*QLoRA.*not quantized"):
        QLoraConfig(target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(UserError, match="target_modules is empty.*train nothing"):
        Config(target_modules=[])
    model = tiny_model("qwen3_moe")
    with pytest.raises(UserError, match=r"matches no parameter.*mlp\.experts\.down_proj"):
        lora.inject(model, Config(target_parameters=["experts.up_proj"]))
    with pytest.raises(UserError, match=r"mlp\.gate\.weight has shape \(4, 64\).*3-D"):
        lora.inject(model, Config(target_parameters=["mlp.gate.weight"]))
    assert not any(isinstance(m, LoRAExperts) for m in model.modules())  # refused with nothing changed
    handle = lora.inject(model, experts_only("qwen3_moe"))
    with pytest.raises(UserError, match="one update per expert"):
        handle.lora_form(model)
    with pytest.raises(UserError, match="do not combine"):
        lora.combine([handle.state_dict(model)] * 2, [1.0, 1.0], handle.cfg)


# PEFT, both ways: the same keys, the same config, the same logits.

def peft_config(name: str, target_parameters: list[str], **kw):
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=R, lora_alpha=4, target_modules=kw.pop("target_modules", []),
                           target_parameters=target_parameters, **kw)


@pytest.mark.parametrize("name", FAMILIES)  # PEFT 0.21 wraps gpt_oss's transposed experts too (is_transposed)
@pytest.mark.parametrize("targets", [["mlp.experts.down_proj"], ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]])
def test_tuneforge_adapter_loads_in_peft(name, targets, ids, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model(name)
    handle = lora.inject(model, Config(r=R, lora_alpha=4, target_modules=[], target_parameters=targets))
    nudge(handle.trainable(model).items(), seed=5)
    save_adapter(model, handle, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_model(name), tmp_path / "a").eval()
    made_there = peft.get_peft_model(tiny_model(name), peft_config(name, targets))
    expected_keys = set(peft.get_peft_model_state_dict(made_there))
    assert set(handle.state_dict(model)) == expected_keys
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_peft_adapter_loads_in_tuneforge(name, ids, tmp_path):
    peft = pytest.importorskip("peft")
    targets = list(family_of(tiny_model(name)).experts)
    theirs = peft.get_peft_model(tiny_model(name), peft_config(name, targets, target_modules=["v_proj"]))
    nudge(((k, p) for k, p in theirs.named_parameters() if p.requires_grad), seed=6)
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "a")
    ours = tiny_model(name)
    handle = load_adapter(ours, tmp_path / "a")
    assert len(lora.expert_layers(ours)) == 2 * 2 and list(lora.layers(ours)) == [
        f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    assert handle.cfg.target_parameters is not None and set(handle.cfg.target_parameters) == set(targets)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(tiny_model(name), ids), expected)  # the adapter does something
