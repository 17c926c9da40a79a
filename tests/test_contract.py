"""The method protocol, checked over every method in REGISTRY on the tiny model.

For each: the trainable count matches the method's formula; only those tensors train; outputs are
unchanged right after inject where the method starts at the identity; save then load is bit-exact;
merged equals unmerged where merge exists, and merge is a clear UserError where it cannot exist.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from tuneforge.errors import UserError
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import REGISTRY

# Tiny llama: hidden 64, MLP 128, 2 layers, 4 query heads and 2 key/value heads of 16.
H, I, L, KV = 64, 128, 2, 32  # KV: width of k_proj / v_proj outputs
LORA_PER_LAYER = 2 * ((H + H) + 2 * (H + KV) + (H + H) + 2 * (H + I) + (I + H))  # r=2 on all seven linears

CASES = {
    # name: (method config, expected trainable count, starts at identity, merge exists)
    "full": ({}, None, True, True),
    "lora": ({"r": 2, "target_modules": "all-linear"}, L * LORA_PER_LAYER, True, True),
    "qlora": ({"r": 2, "target_modules": "all-linear"}, L * LORA_PER_LAYER, False, True),  # 4-bit base differs
    "adapter": ({"placement": "houlsby", "bottleneck_size": 4}, L * 2 * ((H * 4 + 4) + (4 * H + H)), True, False),
    "ia3": ({}, L * (KV + KV + I), True, True),
    "prefix": ({"num_virtual_tokens": 4}, 4 * L * 2 * KV, False, False),
    "prompt": ({"num_virtual_tokens": 4}, 4 * H, False, False),
}
NOT_GRADIENT_METHODS = {"features"}  # a classifier on frozen features: no inject/train/merge protocol


def test_every_registered_method_has_a_contract_case():
    assert set(REGISTRY) - NOT_GRADIENT_METHODS == set(CASES)


@pytest.fixture
def ids(tiny_tokenizer):
    return torch.randint(3, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))


def injected(name: str, vocab: int):
    method = REGISTRY[name]
    model = make_tiny_model(vocab)
    method.inject(model, method.Config(**CASES[name][0]))
    return model, method


def perturb(method, model, seed: int = 1) -> None:
    """Move every trainable tensor away from its initial value, so that saving and merging are tested
    on a trained-looking adapter rather than on zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("name", CASES)
def test_trainable_count_and_nothing_else_trains(name, tiny_tokenizer):
    model, method = injected(name, len(tiny_tokenizer))
    params = method.trainable(model)
    expected = CASES[name][1] or sum(p.numel() for p in make_tiny_model(len(tiny_tokenizer)).parameters())
    assert sum(p.numel() for p in params.values()) == expected
    trainable_ids = {id(p) for p in params.values()}
    assert all(id(p) in trainable_ids for p in model.parameters() if p.requires_grad)
    assert all(p.requires_grad for p in params.values())


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[2]])
def test_outputs_unchanged_right_after_inject(name, tiny_tokenizer, ids):
    base = make_tiny_model(len(tiny_tokenizer))
    model, _ = injected(name, len(tiny_tokenizer))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("name", [n for n in CASES if n != "full"])
def test_save_then_load_is_bit_exact(name, tiny_tokenizer, ids, tmp_path):
    model, method = injected(name, len(tiny_tokenizer))
    perturb(method, model)
    save_adapter(model, tmp_path / name)
    loaded = load_adapter(make_tiny_model(len(tiny_tokenizer)), tmp_path / name)
    for (k, a), (k2, b) in zip(sorted(method.state_dict(model).items()), sorted(method.state_dict(loaded).items())):
        assert k == k2 and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded.eval()(ids).logits)


def test_full_state_dict_round_trip(tiny_tokenizer):
    model, method = injected("full", len(tiny_tokenizer))
    perturb(method, model)
    other, _ = injected("full", len(tiny_tokenizer))
    method.load_state_dict(other, method.state_dict(model))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


@pytest.mark.parametrize("name", CASES)
def test_merged_equals_unmerged_or_merge_says_why_not(name, tiny_tokenizer, ids):
    model, method = injected(name, len(tiny_tokenizer))
    perturb(method, model)
    with torch.no_grad():
        before = model.eval()(ids).logits
    if not CASES[name][3]:
        with pytest.raises(UserError):
            method.merge(model)
        return
    method.merge(model)
    with torch.no_grad():
        after = model(ids).logits
    assert ((after - before).norm() / before.norm()).item() <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_second_inject_raises(name, tiny_tokenizer):
    model, method = injected(name, len(tiny_tokenizer))
    with pytest.raises(RuntimeError, match="already injected"):
        method.inject(model, method.Config(**CASES[name][0]))
