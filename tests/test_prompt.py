"""Prompt tuning on a tiny llama: the forward against a hand-built reference, initializations,
save/load, generation with and without the cache and with left padding, the training loss, a few
training steps, and PEFT interop both ways."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tuneforge.core.config import TrainCfg
from tuneforge.core.errors import UserError
from tuneforge.eval.lm import label_loss
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import prompt
from tuneforge.methods.prompt import Config
from tuneforge.training.loop import train

from conftest import make_tiny_model
from test_train import VOCAB, collate, synthetic_examples

N = 5
GREEDY = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 2, "return_dict_in_generate": True,
          "output_logits": True}


@pytest.fixture
def ids(vocab):
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


def prompted(vocab: int, **kw):
    """(the tiny model with a soft prompt of N tokens, the handle)."""
    model = make_tiny_model(vocab)
    return model, prompt.inject(model, Config(num_virtual_tokens=N, **kw))


def embeddings(model):
    return prompt.state_dict(model, Config())["prompt_embeddings"]  # prompt's state needs no config


def reference_logits(model, ids, mask, seed: int = 0):
    """A base model that is handed [prompt; embeddings] directly: the virtual tokens really there."""
    base = make_tiny_model(model.config.vocab_size, seed)
    soft = embeddings(model).expand(ids.shape[0], -1, -1)
    embeds = torch.cat([soft, base.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([torch.ones(ids.shape[0], N, dtype=mask.dtype), mask], dim=1)
    return base(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, N:]


def test_forward_is_the_prompt_put_before_the_input(vocab, ids):
    model, _ = prompted(vocab)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as in training
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert logits.shape == (*ids.shape, vocab)  # the virtual positions never reach the head
        torch.testing.assert_close(logits, reference_logits(model, ids, mask), rtol=0, atol=1e-6)
        assert not torch.allclose(logits, make_tiny_model(vocab)(ids).logits, atol=1e-2)
        assert torch.equal(model(ids).logits, model(input_ids=ids).logits)  # positional call


def test_trainable_is_only_the_prompt(vocab, ids):
    model, handle = prompted(vocab)
    params = handle.trainable(model)
    assert {id(p) for p in params.values()} == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for p in params.values()) == N * model.config.hidden_size
    model(input_ids=ids, use_cache=False).logits.square().sum().backward()
    assert params["tuneforge_prompt.prompt_embeddings"].grad.abs().sum() > 0


def test_initializations(vocab, tiny_tokenizer, tiny_dir):
    table = make_tiny_model(vocab).get_input_embeddings().weight
    random = embeddings(prompted(vocab)[0])
    assert random.shape == (N, table.shape[1]) and 0.5 < random.std() / table.std() < 2
    sampled = embeddings(prompted(vocab, prompt_tuning_init="SAMPLE_VOCAB")[0])
    assert all((table == row).all(dim=1).any() for row in sampled)  # every row is some token's embedding
    text = "Hi!"  # three byte tokens, repeated to five: H i ! H i
    expected = table[torch.tensor((tiny_tokenizer(text)["input_ids"] * 2)[:N])]
    model = make_tiny_model(vocab)
    prompt.inject(model, Config(num_virtual_tokens=N, prompt_tuning_init="TEXT", prompt_tuning_init_text=text),
                  tokenizer=tiny_tokenizer)
    assert torch.equal(embeddings(model), expected)
    long_text, handle = prompted(vocab, prompt_tuning_init="TEXT", prompt_tuning_init_text="Hello world",
                                 tokenizer_name_or_path=str(tiny_dir))  # cut to five: H e l l o
    assert torch.equal(embeddings(long_text), table[torch.tensor(tiny_tokenizer("Hello")["input_ids"])])
    assert handle.cfg.tokenizer_name_or_path == str(tiny_dir)


def test_config_errors(vocab):
    with pytest.raises(UserError, match="needs the text"):
        Config(prompt_tuning_init="TEXT")
    with pytest.raises(UserError, match="at least 1"):
        Config(num_virtual_tokens=0)
    model = make_tiny_model(vocab)  # built in code: no folder to find a tokenizer in
    with pytest.raises(UserError, match="needs a tokenizer"):
        prompt.inject(model, Config(prompt_tuning_init="TEXT", prompt_tuning_init_text="x"))
    with pytest.raises(UserError, match="token_dim=32"):
        prompt.inject(model, Config(token_dim=32))
    assert not prompt.trainable(model, Config())  # nothing changed: it can be retried
    handle = prompt.inject(model, Config())
    with pytest.raises(UserError, match="cannot be merged"):
        handle.merge(model)


def test_save_then_load_is_bit_exact(vocab, ids, tmp_path):
    model, handle = prompted(vocab)
    save_adapter(model, handle, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == N
    assert (config["token_dim"], config["num_layers"], config["num_attention_heads"]) == (64, 2, 4)
    fresh = make_tiny_model(vocab)
    loaded = load_adapter(fresh, tmp_path / "a")
    assert torch.equal(embeddings(fresh), embeddings(model))
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    sd = handle.state_dict(model)
    with pytest.raises(UserError, match="shape .*num_virtual_tokens"):
        loaded.load_state_dict(fresh, {"prompt_embeddings": torch.zeros(N + 1, 64)})
    with pytest.raises(UserError, match="unexpected tensor 'x'.*method prompt"):
        loaded.load_state_dict(fresh, {**sd, "x": torch.zeros(1)})


def test_generation_with_and_without_cache(vocab, ids):
    model, _ = prompted(vocab)
    cached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **GREEDY)
    uncached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **GREEDY)
    assert cached.sequences.shape[1] == ids.shape[1] + 8 and torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with torch.no_grad():  # the first generated token is the argmax of the plain forward
        first = model(input_ids=ids).logits[:, -1].argmax(-1)
    assert torch.equal(cached.sequences[:, ids.shape[1]], first)


def test_left_padded_batch_generates_as_each_row_alone(vocab, ids):
    model, _ = prompted(vocab)
    short = ids[1, :5]
    batch = torch.stack([ids[0], F.pad(short, (4, 0), value=2)])
    mask = torch.stack([torch.ones(9, dtype=torch.long), F.pad(torch.ones(5, dtype=torch.long), (4, 0))])
    together = model.generate(batch, attention_mask=mask, **GREEDY)
    for row, alone_ids in enumerate([ids[:1], short[None]]):
        alone = model.generate(alone_ids, **GREEDY)
        assert torch.equal(together.sequences[row, 9:], alone.sequences[0, alone_ids.shape[1]:])
        for a, b in zip(together.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("trims_logits", [True, False])
def test_label_loss_equals_hand_computation(trims_logits):
    model = make_tiny_model(VOCAB, seed=1)
    prompt.inject(model, Config(num_virtual_tokens=N))
    model.tuneforge_prompt.trims_logits = trims_logits  # False: as a model without logits_to_keep, whose
    # head sees the virtual positions too and eval.lm's head hook pads its mask for them
    batch = collate(synthetic_examples(5))
    loss, n = label_loss(model, **batch)
    with torch.no_grad():
        logits = reference_logits(model, batch["input_ids"], batch["attention_mask"], seed=1)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
    assert n == 15 and torch.allclose(loss, expected, rtol=1e-5)


def test_training_lowers_the_loss(tmp_path):
    model = make_tiny_model(VOCAB, seed=1)
    handle = prompt.inject(model, Config(num_virtual_tokens=N))
    rows = synthetic_examples(8)
    batch = collate(rows)
    with torch.no_grad():
        before = label_loss(model, **batch)[0].item()
    train(model, handle.trainable(model), rows, collate, TrainCfg(batch_size=8, max_steps=5, learning_rate=0.1),
          tmp_path, progress=False)
    with torch.no_grad():
        after = label_loss(model, **batch)[0].item()
    assert after < before - 0.5, (before, after)


def test_tuneforge_adapter_loads_in_peft(vocab, ids, tmp_path):
    peft = pytest.importorskip("peft")
    model, handle = prompted(vocab)
    save_adapter(model, handle, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(make_tiny_model(vocab), tmp_path / "a").eval()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = theirs(input_ids=ids, attention_mask=mask).logits  # (batch, n + seq, vocab)
    torch.testing.assert_close(got[:, N:], expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_tuneforge(vocab, ids, tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(make_tiny_model(vocab), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB")).eval()
    theirs.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits[:, N:]
    ours = make_tiny_model(vocab)
    load_adapter(ours, tmp_path / "a")
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
