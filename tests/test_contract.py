"""The method protocol, checked over every method in the registry on the tiny model.

For each gradient method: every hook exists; the trainable count matches a count made by hand from
the tiny model's shapes; only those tensors train; outputs are unchanged right after inject where
the method starts at the identity; save then load is bit-exact, key for key; merged equals unmerged
where merge exists, and merge is a clear UserError where it cannot; a second inject is refused.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from tuneforge.core.errors import UserError
from tuneforge.io.export import save_model
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods._shared import GradientMethod, Injected, ProbeMethod
from tuneforge.core.config.methods import METHODS
from tuneforge.methods.registry import REGISTRY, get_method

# Tiny llama: hidden 64, MLP 128, 2 layers, 4 query heads and 2 key/value heads of 16, 259 tokens (tied head).
H, I, L, KV, VOCAB = 64, 128, 2, 32, 259  # KV: width of k_proj / v_proj outputs
BLOCK = H * H + 2 * H * KV + H * H + 3 * H * I + 2 * H  # attention, MLP and two norms
ALL_WEIGHTS = VOCAB * H + L * BLOCK + H  # embeddings (the head is tied to them), blocks, final norm
LORA_PER_LAYER = 2 * ((H + H) + 2 * (H + KV) + (H + H) + 2 * (H + I) + (I + H))  # r=2 on all seven linears
VERA_PER_LAYER = (H + 2 * KV + H + 2 * I + H) + 7 * 4  # r=4 on all seven linears: lambda_b (out,), lambda_d (r,)

CASES = {
    # name: (method config, expected trainable count, starts at identity, merge exists)
    "full": ({}, ALL_WEIGHTS, True, True),
    "lora": ({"r": 2, "target_modules": "all-linear"}, L * LORA_PER_LAYER, True, True),
    "qlora": ({"r": 2, "target_modules": "all-linear"}, L * LORA_PER_LAYER, False, True),  # 4-bit base differs
    "adapter": ({"placement": "houlsby", "bottleneck_size": 4}, L * 2 * ((H * 4 + 4) + (4 * H + H)), True, False),
    "ia3": ({}, L * (KV + KV + I), True, True),
    "vera": ({"r": 4, "target_modules": "all-linear"}, L * VERA_PER_LAYER, True, True),
    "prefix": ({"num_virtual_tokens": 4}, 4 * L * 2 * KV, False, False),
    "prompt": ({"num_virtual_tokens": 4}, 4 * H, False, False),
}
ADAPTERS = [n for n in CASES if not get_method(n).WHOLE_MODEL]
GRADIENT_HOOKS = ("inject", "trainable", "state_dict", "load_state_dict", "file_config", "for_loading", "merge",
                  "lora_form")
PROBE_HOOKS = ("layers", "token_ids", "extract", "fit", "from_state_dict")


def test_every_method_implements_its_whole_protocol():
    gradient = {n for n, m in REGISTRY.items() if m.KIND == "gradient"}
    assert gradient == set(CASES) and set(REGISTRY) - gradient == {"features"}
    assert REGISTRY.keys() == METHODS.keys()
    for name, method in REGISTRY.items():
        hooks = GRADIENT_HOOKS if method.KIND == "gradient" else PROBE_HOOKS
        protocol = GradientMethod if method.KIND == "gradient" else ProbeMethod
        assert all(callable(getattr(method, hook, None)) for hook in hooks), name
        assert set(hooks) <= set(vars(protocol)), "the protocol lists every hook the package calls"
        assert method.NAME == name and method.Config is METHODS[name].config
    with pytest.raises(UserError, match="unknown method 'lorax'.*use one of full, lora"):
        get_method("lorax")


@pytest.fixture
def ids(tiny_tokenizer):
    return torch.randint(3, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))


def injected(name: str):
    method = REGISTRY[name]
    model = make_tiny_model(VOCAB)
    handle = method.inject(model, method.Config(**CASES[name][0]))
    assert isinstance(handle, Injected) and handle.method is method and handle.name == name
    return model, handle


def perturb(handle: Injected, model, seed: int = 1) -> None:
    """Move every trainable tensor away from its initial value, so that saving and merging are tested
    on a trained-looking adapter rather than on zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_the_hand_counts_match_the_tiny_model(tiny_tokenizer):
    assert len(tiny_tokenizer) == VOCAB
    assert sum(p.numel() for p in make_tiny_model(VOCAB).parameters()) == ALL_WEIGHTS


@pytest.mark.parametrize("name", CASES)
def test_trainable_count_and_nothing_else_trains(name):
    model, handle = injected(name)
    params = handle.trainable(model)
    assert sum(p.numel() for p in params.values()) == CASES[name][1]
    trainable_ids = {id(p) for p in params.values()}
    assert all(id(p) in trainable_ids for p in model.parameters() if p.requires_grad)
    assert all(p.requires_grad for p in params.values())


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[2]])
def test_outputs_unchanged_right_after_inject(name, ids):
    base = make_tiny_model(VOCAB)
    model, _ = injected(name)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("name", ADAPTERS)
def test_save_then_load_is_bit_exact(name, ids, tmp_path):
    model, handle = injected(name)
    perturb(handle, model)
    save_adapter(model, handle, tmp_path / name)
    fresh = make_tiny_model(VOCAB)
    loaded = load_adapter(fresh, tmp_path / name)
    assert loaded.method is handle.method
    saved, again = handle.state_dict(model), loaded.state_dict(fresh)
    assert saved.keys() == again.keys() and saved
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, fresh.eval()(ids).logits)


def test_full_saves_a_whole_model_and_refuses_an_adapter(ids, tmp_path, tiny_tokenizer):
    model, handle = injected("full")
    perturb(handle, model)
    with pytest.raises(UserError, match="whole model, not an adapter.*save_model"):
        save_adapter(model, handle, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    save_model(model, tiny_tokenizer, tmp_path / "model")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model.eval()(ids).logits)
    other, _ = injected("full")
    handle.load_state_dict(other, handle.state_dict(model))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


@pytest.mark.parametrize("name", [n for n in CASES if n != "full"])  # full has nothing to fold: tested above
def test_merged_equals_unmerged_or_merge_says_why_not(name, ids):
    model, handle = injected(name)
    perturb(handle, model)
    with torch.no_grad():
        before = model.eval()(ids).logits
    if not CASES[name][3]:
        with pytest.raises(UserError):
            handle.merge(model)
        return
    handle.merge(model)
    assert not any(type(m).__module__.startswith("tuneforge") for m in model.modules())  # plain transformers
    with torch.no_grad():
        after = model(ids).logits
    assert ((after - before).norm() / before.norm()).item() <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_second_inject_raises(name):
    model, handle = injected(name)
    for other in ("lora", "full", name):
        with pytest.raises(RuntimeError, match="already injected"):
            REGISTRY[other].inject(model, REGISTRY[other].Config())


@pytest.mark.parametrize("name", CASES)
def test_nothing_rides_on_the_model(name):
    """What a method adds is modules (found by type) and hooks, never an attribute to be read back."""
    model, _ = injected(name)
    fresh = make_tiny_model(VOCAB)
    assert set(vars(model)) == set(vars(fresh))
