"""Prefix tuning on a tiny llama (grouped-query attention: 4 query heads, 2 key/value heads): the
forward against a hand-built cache, the reparameterization and its folding, save/load, generation
with and without the cache and with left padding, the training loss, a few training steps, and
PEFT interop both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tuneforge.core.config import TrainCfg
from tuneforge.core.errors import UserError
from tuneforge.eval.lm import label_loss
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import prefix
from tuneforge.methods.prefix import Config
from tuneforge.training.loop import train

from conftest import make_tiny_model
from test_train import VOCAB, collate, synthetic_examples

N, LAYERS, KV_HEADS, HEAD_DIM = 5, 2, 2, 16
GREEDY = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 2, "return_dict_in_generate": True,
          "output_logits": True}


@pytest.fixture
def ids(vocab):
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


def prefixed(vocab: int, seed: int = 0, **kw):
    """(the tiny model with a prefix of N tokens, the handle)."""
    model = make_tiny_model(vocab, seed)
    return model, prefix.inject(model, Config(num_virtual_tokens=N, **kw))


def saved_prefix(model):
    return prefix.state_dict(model, Config())["prompt_embeddings"]  # prefix's state needs no config


def nudge(model, seed: int = 1) -> None:
    """Move every trainable tensor, as training would (the MLP too, with the projection)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prefix.trainable(model, Config()).values():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def reference_logits(model, ids, mask, seed: int = 0):
    """A base model handed the saved prefix as its cache, unpacked by the documented layout:
    the last axis is (layer, key|value, kv_head, head_dim); real tokens at positions n.."""
    base = make_tiny_model(model.config.vocab_size, seed)
    flat = saved_prefix(model).view(N, LAYERS, 2, KV_HEADS, HEAD_DIM)
    cache = DynamicCache(config=base.config)
    for layer in range(LAYERS):
        keys, values = (flat[:, layer, i].transpose(0, 1).expand(ids.shape[0], -1, -1, -1) for i in (0, 1))
        cache.update(keys, values, layer)
    mask = torch.cat([torch.ones(ids.shape[0], N, dtype=mask.dtype), mask], dim=1)
    positions = torch.arange(N, N + ids.shape[1])[None]
    return base(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache).logits


def test_forward_is_the_prefix_in_the_cache(vocab, ids):
    model, _ = prefixed(vocab)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as in training
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        torch.testing.assert_close(out.logits, reference_logits(model, ids, mask), rtol=0, atol=1e-6)
        assert out.cache is None  # use_cache=False: no cache comes back, as without the method
        assert not torch.allclose(out.logits, make_tiny_model(vocab)(ids).logits, atol=1e-2)
        assert model(ids, use_cache=True).cache.get_seq_length() == N + ids.shape[1]
        assert torch.equal(model(ids).logits, model(input_ids=ids).logits)  # positional call


def test_trainable_is_only_the_prefix(vocab, ids):
    model, handle = prefixed(vocab)
    params = handle.trainable(model)
    assert {id(p) for p in params.values()} == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for p in params.values()) == N * LAYERS * 2 * KV_HEADS * HEAD_DIM
    model(input_ids=ids, use_cache=False).logits.square().sum().backward()
    assert params["tuneforge_prefix.embedding"].grad.abs().sum() > 0


def test_projection_trains_an_mlp_and_saves_the_prefix_it_computes(vocab, ids, tmp_path):
    model, handle = prefixed(vocab, prefix_projection=True, encoder_hidden_size=24)
    params = handle.trainable(model)
    token_dim, width = KV_HEADS * HEAD_DIM, LAYERS * 2 * KV_HEADS * HEAD_DIM
    assert sum(p.numel() for p in params.values()) == N * token_dim + token_dim * 24 + 24 + 24 * width + width
    nudge(model)
    module = model.tuneforge_prefix
    expected = module.transform(module.embedding).detach()
    assert torch.equal(saved_prefix(model), expected)
    save_adapter(model, handle, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["prefix_projection"] is False and config["encoder_hidden_size"] == 24
    fresh = make_tiny_model(vocab)
    load_adapter(fresh, tmp_path / "a")
    assert fresh.tuneforge_prefix.transform is None
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_zero_init_and_config_errors(vocab):
    assert not saved_prefix(prefixed(vocab, init_weights="zero")[0]).any()
    assert not saved_prefix(prefixed(vocab, prefix_projection=True, init_weights="zero")[0]).any()
    with pytest.raises(UserError, match="at least 1"):
        Config(num_virtual_tokens=0)
    model = make_tiny_model(vocab)
    with pytest.raises(UserError, match="num_attention_heads=4"):  # PEFT records kv heads for GQA
        prefix.inject(model, Config(num_attention_heads=4))
    assert not prefix.trainable(model, Config())  # nothing changed: it can be retried
    handle = prefix.inject(model, Config())
    with pytest.raises(UserError, match="cannot be merged"):
        handle.merge(model)


def test_text_init_is_the_text_put_before_the_input(tiny, ids, tmp_path):
    """Started from a text, the prefixed model is exactly the base model reading that text first."""
    base, tokenizer = tiny
    text = tokenizer("Hello")["input_ids"]  # five tokens: N of them, so the prefix is this text
    model = copy.deepcopy(base)
    handle = prefix.inject(model, Config(num_virtual_tokens=N, init_text="Hello"), tokenizer=tokenizer)
    ids = ids % base.config.vocab_size
    with torch.no_grad():
        whole = base(torch.cat([torch.tensor([text] * ids.shape[0]), ids], dim=1)).logits[:, N:]
        torch.testing.assert_close(model(ids).logits, whole, rtol=0, atol=1e-5)
    assert handle.trainable(model)["tuneforge_prefix.embedding"].requires_grad
    save_adapter(model, handle, tmp_path / "a")  # loads without a tokenizer: the weights replace the init
    fresh = copy.deepcopy(base)
    loaded = load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, whole, rtol=0, atol=1e-5)
    assert loaded.cfg.init_text == "Hello"  # saved again, it still says how it started
    with pytest.raises(UserError, match="init_text"):
        Config(init_text="x", prefix_projection=True)
    with pytest.raises(UserError, match="needs a tokenizer"):
        prefix.inject(make_tiny_model(base.config.vocab_size), Config(init_text="x"))


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable:FutureWarning")
def test_gradient_checkpointing_is_refused(vocab, ids):
    model, _ = prefixed(vocab)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(UserError, match="gradient_checkpointing"):
        model(input_ids=ids, use_cache=False)


def test_save_then_load_is_bit_exact(vocab, ids, tmp_path):
    model, handle = prefixed(vocab)
    save_adapter(model, handle, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (32, 2, 2)
    fresh = make_tiny_model(vocab)
    loaded = load_adapter(fresh, tmp_path / "a")
    saved, again = handle.state_dict(model), loaded.state_dict(fresh)
    assert saved.keys() == again.keys() and torch.equal(saved["prompt_embeddings"], again["prompt_embeddings"])
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    with pytest.raises(UserError, match="shape .*num_virtual_tokens"):
        loaded.load_state_dict(fresh, {"prompt_embeddings": torch.zeros(N, 64)})
    with pytest.raises(UserError, match="unexpected tensor 'x'.*method prefix"):
        loaded.load_state_dict(fresh, {**saved, "x": torch.zeros(1)})


def test_generation_with_and_without_cache(vocab, ids):
    model, _ = prefixed(vocab)
    cached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **GREEDY)
    uncached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **GREEDY)
    assert cached.sequences.shape[1] == ids.shape[1] + 8 and torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with torch.no_grad():
        first = model(input_ids=ids).logits[:, -1].argmax(-1)
    assert torch.equal(cached.sequences[:, ids.shape[1]], first)


def test_left_padded_batch_generates_as_each_row_alone(vocab, ids):
    model, _ = prefixed(vocab)
    short = ids[1, :5]
    batch = torch.stack([ids[0], F.pad(short, (4, 0), value=2)])
    mask = torch.stack([torch.ones(9, dtype=torch.long), F.pad(torch.ones(5, dtype=torch.long), (4, 0))])
    together = model.generate(batch, attention_mask=mask, **GREEDY)
    for row, alone_ids in enumerate([ids[:1], short[None]]):
        alone = model.generate(alone_ids, **GREEDY)
        assert torch.equal(together.sequences[row, 9:], alone.sequences[0, alone_ids.shape[1]:])
        for a, b in zip(together.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-5)


def test_label_loss_equals_hand_computation():
    model, _ = prefixed(VOCAB, seed=1)
    batch = collate(synthetic_examples(5))
    loss, n = label_loss(model, **batch)
    with torch.no_grad():
        logits = reference_logits(model, batch["input_ids"], batch["attention_mask"], seed=1)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
    assert n == 15 and torch.allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_training_lowers_the_loss(tmp_path, projection):
    model, handle = prefixed(VOCAB, seed=1, prefix_projection=projection)
    rows = synthetic_examples(8)
    batch = collate(rows)
    with torch.no_grad():
        before = label_loss(model, **batch)[0].item()
    train(model, handle.trainable(model), rows, collate, TrainCfg(batch_size=8, max_steps=5, learning_rate=0.05),
          tmp_path, progress=False)
    with torch.no_grad():
        after = label_loss(model, **batch)[0].item()
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize("projection", [False, True])
def test_tuneforge_adapter_loads_in_peft(vocab, ids, tmp_path, projection):
    peft = pytest.importorskip("peft")
    model, handle = prefixed(vocab, prefix_projection=projection)
    nudge(model)
    save_adapter(model, handle, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(make_tiny_model(vocab), tmp_path / "a").eval()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_peft_adapter_loads_in_tuneforge(vocab, ids, tmp_path, projection):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(make_tiny_model(vocab), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection, encoder_hidden_size=24))
    theirs.save_pretrained(tmp_path / "a")
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    ours = make_tiny_model(vocab)
    load_adapter(ours, tmp_path / "a")
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.real
def test_real_model_matches_peft_and_generates_with_the_cache(tmp_path):
    """The default model: 9 query heads, 3 key/value heads."""
    peft = pytest.importorskip("peft")
    from tuneforge.io.load import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    base = copy.deepcopy(model)
    handle = prefix.inject(model, Config(num_virtual_tokens=4))
    save_adapter(model, handle, tmp_path / "a")
    ids = tok("The quick brown fox jumps over", return_tensors="pt").input_ids
    kw = {**GREEDY, "max_new_tokens": 4, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        cached, uncached = (model.generate(ids, use_cache=c, **kw) for c in (True, False))
    assert torch.equal(cached.sequences, uncached.sequences)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
