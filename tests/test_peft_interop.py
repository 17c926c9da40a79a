"""Adapters cross between tuneforge and PEFT both ways and give the same outputs."""

from __future__ import annotations


import pytest
import torch

from tuneforge.core.errors import UserError
from tuneforge.io.peft_format import load_adapter, read_config, save_adapter
from tuneforge.methods import lora

from conftest import in_peft, make_tiny_model

peft = pytest.importorskip("peft")

CASES = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": "all-linear"},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "k_proj", "up_proj"]},
    "regex+saved": {"r": 2, "lora_alpha": 4, "target_modules": r".*\.(o_proj|down_proj)", "modules_to_save": ["norm"]},
}


def nudge(params, seed: int) -> None:
    """Random nonzero values for every B (and scaled DoRA magnitudes, and saved norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name or name.endswith("norm.weight"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def ids(vocab):
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", CASES)
def test_tuneforge_adapter_loads_in_peft(vocab, ids, tmp_path, case):
    model = make_tiny_model(vocab)
    adapter = lora.inject(model, lora.Config(**CASES[case]))
    nudge(adapter.trainable(model).items(), seed=1)
    expected = model(ids).logits
    save_adapter(model, adapter, tmp_path / "a")
    theirs = in_peft(make_tiny_model(vocab), tmp_path / "a")
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_tuneforge(vocab, ids, tmp_path, case):
    theirs = peft.get_peft_model(make_tiny_model(vocab), peft.LoraConfig(task_type="CAUSAL_LM", **CASES[case]))
    nudge(((n, p) for n, p in theirs.named_parameters() if p.requires_grad), seed=2)
    theirs.eval()
    expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path / "a")
    ours = make_tiny_model(vocab)
    load_adapter(ours, tmp_path / "a")
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(make_tiny_model(vocab)(ids).logits, expected)  # the adapter does something


@pytest.mark.real
def test_real_model_greedy_generations_match(tmp_path):
    from tuneforge.io.load import load_model

    model, tok = load_model("smollm2-135m", device="cpu")  # a fresh copy: real_model stays untouched
    adapter = lora.inject(model, lora.Config(r=8, lora_alpha=16, target_modules="all-linear"))
    nudge(adapter.trainable(model).items(), seed=3)
    save_adapter(model, adapter, tmp_path / "a", base_model_name="smollm2-135m")
    theirs = peft.PeftModel.from_pretrained(load_model("smollm2-135m", device="cpu")[0], tmp_path / "a").eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    kw = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        ours_out = model.generate(**prompt, **kw)
        theirs_out = theirs.generate(**prompt, **kw)
    assert ours_out.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(ours_out, theirs_out), (tok.decode(ours_out[0]), tok.decode(theirs_out[0]))


def test_a_missing_adapter_folder_and_a_folder_that_is_no_adapter_are_told_apart(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        read_config(tmp_path / "typo")
    with pytest.raises(UserError, match="no adapter_config.json here, so this is not an adapter folder"):
        read_config(tmp_path)


def test_an_adapter_forced_onto_a_model_of_other_sizes_says_so_not_that_its_config_is_damaged(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = make_tiny_model(64)
    save_adapter(model, lora.inject(model, lora.Config(r=4, target_modules="all-linear")), tmp_path / "a")
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    with pytest.raises(UserError, match="this model makes .*lora_A.weight of shape \\(4, 96\\), and the adapter holds "
                                        "\\(4, 64\\): it was made for a model of other sizes") as err:
        load_adapter(wider, tmp_path / "a", force=True)
    assert "load the base the adapter was trained on" in err.value.line()
