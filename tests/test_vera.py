"""VeRA on a tiny llama: the layer against a hand-written reference, identity at the start, PEFT's keys,
projections and logits both ways, merge, save/load, the LoRA form (and its GGUF file), and a short run."""

from __future__ import annotations

import json
import math
import warnings

import gguf
import pytest
import torch
from torch import nn

from conftest import in_peft, make_tiny_model
from test_export import base_dir, make_adapter, tensors  # noqa: F401  (base_dir is a fixture)
from tuneforge.core import config
from tuneforge.core.errors import UserError
from tuneforge.io.export import export
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import vera
from tuneforge.methods.vera import Config, Projections, VeraLinear

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # outputs 64, 32, 128, 64; inputs 64, 64, 64, 128


def trained_like(params, seed: int = 1) -> None:
    """Every lambda set to random values of the size training reaches, so that a wrong key, slice or order
    changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def test_layer_and_fold_equal_reference():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    pair = Projections(4, 20, 24, key=3, device=torch.device("cpu"))  # wider than the layer: it reads a corner
    layer = VeraLinear(base, pair, Config(r=4))
    assert torch.equal(layer.vera_lambda_b, torch.zeros(12)) and torch.equal(layer.vera_lambda_d, torch.full((4,), 0.1))
    trained_like([layer.vera_lambda_b, layer.vera_lambda_d])
    x = torch.randn(3, 16)
    a, b = pair.vera_A[:, :16], pair.vera_B[:12]  # (4, 16), (12, 4)
    expected = base(x) + layer.vera_lambda_b * ((layer.vera_lambda_d * (x @ a.T)) @ b.T)
    torch.testing.assert_close(layer(x), expected)
    a2, b2 = layer.low_rank()
    torch.testing.assert_close(b2 @ a2, torch.diag(layer.vera_lambda_b) @ b @ torch.diag(layer.vera_lambda_d) @ a)
    torch.testing.assert_close(layer.folded()(x), expected, rtol=1e-6, atol=1e-6)


def test_projections_are_kaiming_uniform_and_follow_the_key():
    first, again, other = (Projections(8, 64, 128, key, torch.device("cpu")) for key in (0, 0, 1))
    assert torch.equal(first.vera_A, again.vera_A) and torch.equal(first.vera_B, again.vera_B)
    assert not torch.equal(first.vera_A, other.vera_A)
    assert first.vera_A.abs().max() <= math.sqrt(6 / 64) and first.vera_B.abs().max() <= math.sqrt(6 / 8)
    assert first.vera_A.abs().max() > 0.9 * math.sqrt(6 / 64)  # uniform over the whole bound


def test_identity_right_after_inject(tiny, ids):
    model, _ = tiny
    before = model(ids).logits
    vera.inject(model, Config(target_modules=TARGETS))
    assert torch.equal(model(ids).logits, before)


def test_defaults_shapes_names_and_only_the_vectors_train(tiny):
    model, _ = tiny
    handle = vera.inject(model, Config())  # llama: q_proj and v_proj, as PEFT picks them; r = 256
    params = handle.trainable(model)
    assert list(params)[:4] == [f"model.layers.0.self_attn.{m}.vera_lambda_{v}" for m in ("q_proj", "v_proj")
                                for v in ("b", "d")]
    assert sum(p.numel() for p in params.values()) == 2 * ((64 + 256) + (32 + 256))
    assert {id(p) for p in params.values()} == {id(p) for p in model.parameters() if p.requires_grad}
    pairs = {id(layer.projections) for layer in vera.layers(model).values()}
    assert len(pairs) == 1  # one pair for the whole model, at the widest input and output: (256, 64), (64, 256)
    layer = next(iter(vera.layers(model).values()))
    assert layer.projections.vera_A.shape == (256, 64) and layer.projections.vera_B.shape == (64, 256)


def test_merged_equals_unmerged(tiny, ids):
    model, _ = tiny
    handle = vera.inject(model, Config(r=8, target_modules=TARGETS))
    trained_like(handle.trainable(model).values())
    unmerged = model(ids).logits
    handle.merge(model)
    assert not vera.layers(model) and type(model.model.layers[0].mlp.down_proj) is nn.Linear
    merged = model(ids).logits
    assert ((merged - unmerged).norm() / unmerged.norm()).item() <= 1e-5


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_then_load_is_bit_exact(tiny, tmp_path, ids, save_projection):
    model, _ = tiny
    handle = vera.inject(model, Config(r=8, target_modules=TARGETS, save_projection=save_projection,
                                       projection_prng_key=7, modules_to_save=["norm"]))
    trained_like(handle.trainable(model).values())
    save_adapter(model, handle, tmp_path / "a")
    config_file = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config_file["peft_type"] == "VERA" and config_file["target_modules"] == sorted(TARGETS)
    assert config_file["projection_prng_key"] == 7 and config_file["modules_to_save"] == ["model.norm"]
    saved = handle.state_dict(model)
    assert ("base_model.vera_A" in saved) == ("base_model.vera_B" in saved) == save_projection
    assert saved["base_model.model.model.layers.1.mlp.down_proj.vera_lambda_b"].shape == (64,)
    fresh = make_tiny_model(model.config.vocab_size)
    again = load_adapter(fresh, tmp_path / "a").state_dict(fresh)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_lora_form_is_the_update_and_its_gguf_file_applies_as_the_merge(base_dir, tmp_path):  # noqa: F811
    """VeRA's update as LoRA's (A', B', 1): llama.cpp's arithmetic on the files, W + alpha / r * B' A' with
    alpha = r, is the merged weight."""
    adapter = make_adapter(base_dir, tmp_path / "adapter", "vera", r=8, target_modules="all-linear")
    export(str(base_dir), tmp_path / "base.gguf", "gguf")
    export(str(base_dir), tmp_path / "merged.gguf", "gguf", adapter_dir=adapter)
    export(str(base_dir), tmp_path / "lora.gguf", "gguf-lora", adapter_dir=adapter)
    alpha = gguf.GGUFReader(tmp_path / "lora.gguf").fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(8)
    base, merged, lora = (tensors(tmp_path / f"{n}.gguf") for n in ("base", "merged", "lora"))
    pairs = [name[:-len(".lora_a")] for name in lora if name.endswith(".lora_a")]
    assert len(pairs) == 2 * 7
    for name in pairs:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        assert a.shape[0] == b.shape[1] == 8
        torch.testing.assert_close(torch.from_numpy(base[name] + alpha / 8 * b @ a), torch.from_numpy(merged[name]),
                                   rtol=0, atol=1e-5)


def test_errors(tiny):
    model, _ = tiny
    for bad, key in (({"bias": "all"}, "method.bias"), ({"r": 0}, "method.r"), ({"target_modules": []},
                                                                                 "method.target_modules")):
        with pytest.raises(UserError) as exc:
            config.from_dict({"method": {"name": "vera", **bad}})
        assert key in exc.value.where
    handle = vera.inject(model, Config(r=4))
    with pytest.raises(RuntimeError, match="already injected"):
        vera.inject(model, Config(r=4))
    sd = handle.state_dict(model)
    with pytest.raises(UserError, match="shape"):
        handle.load_state_dict(model, {**sd, "base_model.vera_A": torch.ones(4, 32)})
    with pytest.raises(UserError, match="missing"):
        handle.load_state_dict(model, {k: v for k, v in sd.items() if k != "base_model.vera_B"})


@pytest.mark.parametrize("save_projection", [True, False])
def test_tuneforge_adapter_loads_in_peft(vocab, ids, tmp_path, save_projection):
    pytest.importorskip("peft")
    model = make_tiny_model(vocab)
    handle = vera.inject(model, Config(r=8, target_modules=TARGETS, save_projection=save_projection))
    trained_like(handle.trainable(model).values())
    expected = model(ids).logits
    save_adapter(model, handle, tmp_path / "a")
    theirs = in_peft(make_tiny_model(vocab), tmp_path / "a")
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(make_tiny_model(vocab)(ids).logits, expected)  # the adapter does something


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_adapter_loads_in_tuneforge(vocab, ids, tmp_path, save_projection):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's warning that a projection rebuilt from the key is less portable
        config_ = peft.VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=TARGETS, projection_prng_key=5,
                                  save_projection=save_projection)
        theirs = peft.get_peft_model(make_tiny_model(vocab), config_)
    trained_like((p for p in theirs.parameters() if p.requires_grad), seed=2)
    theirs.eval()
    expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path / "a")
    ours = make_tiny_model(vocab)
    handle = load_adapter(ours, tmp_path / "a")
    assert handle.method is vera and handle.cfg.projection_prng_key == 5 and len(vera.layers(ours)) == 2 * 4
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(make_tiny_model(vocab)(ids).logits, expected)  # the adapter does something


def test_a_run_lowers_the_loss(tmp_path, tiny_dir):
    import tuneforge

    words = {"positive": "good fine great lovely", "negative": "bad awful poor dull"}
    rows = [{"text": f"{words[lab].split()[i % 4]} film number {i}", "label": lab}
            for i in range(16) for lab in ("positive", "negative")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.from_dict({"model": str(tiny_dir), "method": {"name": "vera", "r": 32, "target_modules": "all-linear"},
                            "data": {"path": str(data), "format": "classification", "val_fraction": 0.25},
                            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 12, "batch_size": 8,
                                      "learning_rate": 5e-2, "device": "cpu", "eval_at_start": True}})
    summary = tuneforge.train(cfg, progress=False)
    assert summary["method"] == "vera"
    assert summary["after"]["loss"] < summary["before"]["loss"] - 0.05  # 5.51 -> 5.18 measured
    assert json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())["peft_type"] == "VERA"
