"""(IA)^3 on a tiny llama: the math against a hand-written reference, identity at the start, PEFT's
shapes and keys, merge, save/load, training, generation, and adapters crossing to and from PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tuneforge.core.config import TrainCfg
from tuneforge.core.errors import UserError
from tuneforge.eval.lm import evaluate_lm
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import ia3
from tuneforge.methods.ia3 import Config, IA3Linear
from tuneforge.training.loop import train

from conftest import in_peft, make_tiny_model
from test_train import VOCAB, collate, synthetic_examples


def nudge(params, seed: int = 1) -> None:
    """Vectors (and saved norms) away from ones: l * (1 + 0.1 * noise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_and_fold_equal_reference(feedforward):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = IA3Linear(base, feedforward, Config())
    assert layer.ia3_l.shape == ((1, 16) if feedforward else (12, 1))  # PEFT's shapes
    nn.init.normal_(layer.ia3_l)
    x = torch.randn(3, 16)
    if feedforward:  # the input is scaled
        expected = (x * layer.ia3_l[0]) @ base.weight.T + base.bias
    else:  # the output is scaled, bias included
        expected = (x @ base.weight.T + base.bias) * layer.ia3_l[:, 0]
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.folded()(x), expected, rtol=1e-6, atol=1e-6)


def test_identity_right_after_inject(tiny, ids):
    model, _ = tiny
    before = model(ids).logits
    ia3.inject(model, Config())
    assert torch.equal(model(ids).logits, before)


def test_trainable_count_and_only_the_vectors(tiny):
    model, _ = tiny
    params = ia3.inject(model, Config()).trainable(model)
    # k_proj and v_proj out: 2 kv heads * 16 = 32 each; down_proj in: 128; 2 blocks
    assert sum(p.numel() for p in params.values()) == 2 * (32 + 32 + 128)
    assert {id(p) for p in params.values()} == {id(p) for p in model.parameters() if p.requires_grad}
    shapes = {k.split(".", 3)[3]: tuple(p.shape) for k, p in params.items() if ".layers.0." in k}
    assert shapes == {"self_attn.k_proj.ia3_l": (32, 1), "self_attn.v_proj.ia3_l": (32, 1),
                      "mlp.down_proj.ia3_l": (1, 128)}


def test_merged_equals_unmerged(tiny, ids):
    model, _ = tiny
    handle = ia3.inject(model, Config(target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                                      feedforward_modules=["up_proj", "down_proj"]))
    nudge(handle.trainable(model).items())
    unmerged = model(ids).logits
    handle.merge(model)
    assert not ia3.layers(model) and type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert rel_err(model(ids).logits, unmerged) <= 1e-5


def test_save_then_load_is_bit_exact(tiny, tmp_path, ids):
    model, _ = tiny
    handle = ia3.inject(model, Config(modules_to_save=["norm"]))
    nudge(handle.trainable(model).items())
    save_adapter(model, handle, tmp_path / "a", base_model_name="tiny")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert config["feedforward_modules"] == ["down_proj"] and config["modules_to_save"] == ["model.norm"]
    fresh = make_tiny_model(model.config.vocab_size)
    loaded = load_adapter(fresh, tmp_path / "a")
    saved, again = handle.state_dict(model), loaded.state_dict(fresh)
    assert "base_model.model.model.layers.1.self_attn.v_proj.ia3_l" in saved
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_changing_a_vector_changes_the_output(tiny, ids):
    model, _ = tiny
    ia3.inject(model, Config())
    before = model(ids).logits
    for path, layer in ia3.layers(model).items():
        with torch.no_grad():
            layer.ia3_l.fill_(0.5)
        assert not torch.allclose(model(ids).logits, before), path  # every target is wired in
        before = model(ids).logits


def test_training_lowers_the_loss(tmp_path):
    model = make_tiny_model(VOCAB, seed=1)
    handle = ia3.inject(model, Config())
    rows = synthetic_examples(16)
    before = evaluate_lm(model, rows, collate)["loss"]
    train(model, handle.trainable(model), rows, collate, TrainCfg(batch_size=8, max_steps=20, learning_rate=0.1),
          tmp_path, progress=False)
    assert evaluate_lm(model, rows, collate)["loss"] < before - 0.05  # 3.71 -> 3.60 measured


def test_generation_is_greedy_decoding_of_the_adapted_model(tiny, ids):
    """generate (with its KV cache) picks, token by token, the argmax of the scaled model run on the
    whole sequence so far without a cache."""
    model, tok = tiny
    nudge(ia3.inject(model, Config()).trainable(model).items())
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    expected = ids
    for _ in range(3):
        logits = model(expected, use_cache=False).logits[:, -1]
        expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_errors(tiny):
    model, _ = tiny
    with pytest.raises(UserError, match="which target_modules does not"):
        ia3.inject(model, Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"]))
    assert not ia3.layers(model)  # nothing changed: it can be retried
    # The family's feedforward layer (down_proj) is feedforward only where the targets include it
    handle = ia3.inject(model, Config(target_modules=["k_proj", "v_proj"]))
    assert not any(layer.is_feedforward for layer in ia3.layers(model).values())
    sd = handle.state_dict(model)
    key = next(iter(sd))
    with pytest.raises(UserError, match="shape"):
        handle.load_state_dict(model, {**sd, key: torch.ones(1, 32)})
    with pytest.raises(UserError, match="unexpected tensor"):
        handle.load_state_dict(model, {**sd, "x.ia3_l": torch.ones(1)})


def test_tuneforge_adapter_loads_in_peft(vocab, ids, tmp_path):
    pytest.importorskip("peft")
    model = make_tiny_model(vocab)
    handle = ia3.inject(model, Config(modules_to_save=["norm"]))
    nudge(handle.trainable(model).items(), seed=1)
    expected = model(ids).logits
    save_adapter(model, handle, tmp_path / "a")
    theirs = in_peft(make_tiny_model(vocab), tmp_path / "a")
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_tuneforge(vocab, ids, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                            feedforward_modules=["down_proj"])
    theirs = peft.get_peft_model(make_tiny_model(vocab), config)
    nudge(((n, p) for n, p in theirs.named_parameters() if p.requires_grad), seed=2)
    theirs.eval()
    expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path / "a")
    ours = make_tiny_model(vocab)
    load_adapter(ours, tmp_path / "a")
    assert sum(layer.is_feedforward for layer in ia3.layers(ours).values()) == 2  # one down_proj per block
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(make_tiny_model(vocab)(ids).logits, expected)  # the adapter does something


def test_on_layers_quantized_by_hand_it_merges_into_dense_ones(vocab, ids):
    """quantize_linears_ then ia3: a composition the user may make (only another method, or
    full fine-tuning of 4-bit codes, is refused)."""
    from tuneforge.model import targets
    from tuneforge.quant.nf4 import NF4Linear, quantize_linears_

    model = make_tiny_model(vocab)
    quantize_linears_(model, targets.find(model, ["k_proj", "v_proj", "down_proj"]))
    handle = ia3.inject(model, Config())
    nudge(handle.trainable(model).items())
    unmerged = model(ids).logits
    handle.merge(model)
    assert not any(isinstance(m, (NF4Linear, IA3Linear)) for m in model.modules())
    assert rel_err(model(ids).logits, unmerged) <= 1e-5
