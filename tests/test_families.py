"""Every method on a tiny random model of every family in ``tests/families.py``: the loss is the
model's own, two steps train, the result saves and loads, merges where the math allows, and PEFT
loads the adapters it has. ``TUNEFORGE_MODELS_MD=1`` writes docs/models.md from the outcomes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from families import FAMILIES, tiny_model
from tuneforge.core.errors import UserError
from tuneforge.eval.lm import label_loss
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods.registry import get_method
from tuneforge.model.families import family_of
from tuneforge.model.kernels import use_lean_modules

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
# (method, config keys): every gradient method with its defaults, DoRA and Houlsby's placement besides
METHODS = {"full": ("full", {}), "lora": ("lora", {}), "dora": ("lora", {"use_dora": True}), "qlora": ("qlora", {}),
           "adapter": ("adapter", {"placement": "houlsby"}), "ia3": ("ia3", {}), "vera": ("vera", {"r": 16}),
           "prefix": ("prefix", {"num_virtual_tokens": 4}), "prompt": ("prompt", {"num_virtual_tokens": 4})}
PEFT_LOADS = {"lora", "dora", "ia3", "vera", "prefix", "prompt"}
OUTCOMES: dict[tuple[str, str], str] = {}


def batch() -> dict[str, torch.Tensor]:
    """Three rows that share 6 leading tokens, of 14, 11 and 9 tokens (right-padded), labelled after
    their 8th token: an instruction batch, which takes the shared-prefix path where it is allowed."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 14), generator=gen)
    ids[:, :6] = ids[0, :6]
    mask = torch.ones_like(ids)
    for row, length in ((1, 11), (2, 9)):
        mask[row, length:] = 0
        ids[row, length:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :8] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mean_loss(model) -> torch.Tensor:
    total, n = label_loss(model, **batch())
    return total / n


@pytest.mark.parametrize("name", FAMILIES)
def test_the_loss_is_the_models_own(name):
    """tuneforge's loss, through every speed-up the family allows, equals ``model(..., labels=...)``."""
    own = tiny_model(name, VOCAB)(**batch()).loss
    model = tiny_model(name, VOCAB)
    use_lean_modules(model)
    torch.testing.assert_close(mean_loss(model), own, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_frozen_layers_held_in_bf16_give_the_step_autocast_gives(name):
    """Under bf16 autocast, a LoRA step over the base with its frozen linear layers held in bf16 (as a run
    holds them) has the loss and gradients of the step over the float32 base, to the bit."""
    from tuneforge.methods import lora
    from tuneforge.training.precision import hold_frozen_linears

    steps = []
    for hold in (False, True):
        model = tiny_model(name, VOCAB).train()
        use_lean_modules(model)
        lora.inject(model, lora.Config(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        if hold:
            hold_frozen_linears(model, "bf16", torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mean_loss(model)
        loss.backward()
        steps.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (loss, grads), (held_loss, held_grads) = steps
    assert torch.equal(loss, held_loss) and len(grads) == len(held_grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, held_grads))


def test_an_unknown_family_runs_its_own_forward(capsys):
    model = tiny_model("gemma2", VOCAB)
    model.config.model_type = "not_a_family_tuneforge_knows"
    family = family_of(model)
    assert not family.known and "not a family tuneforge knows" in capsys.readouterr().err
    assert use_lean_modules(model) == 0
    torch.testing.assert_close(mean_loss(model), tiny_model("gemma2", VOCAB)(**batch()).loss, rtol=1e-5, atol=0)


def test_gemma2_softcaps_so_the_head_shortcut_stands_aside():
    model = tiny_model("gemma2", VOCAB)
    assert model.config.final_logit_softcapping and not family_of(model).head_is_logits(model.config)


def _logits(model) -> torch.Tensor:
    b = batch()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def _train_two_steps(model, params) -> list[float]:
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(2):
        loss = mean_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _nudge(params) -> None:  # so that a zero-initialized update is not zero when logits are compared
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_method_trains_saves_loads_and_merges(name, method_name, tmp_path):
    method_key, keys = METHODS[method_name]
    method = get_method(method_key)
    model = tiny_model(name, VOCAB)
    try:
        handle = method.inject(model, method.Config(**keys))
    except UserError as exc:  # a refusal is one line that says what to set
        OUTCOMES[name, method_name] = f"refused: {exc}"
        pytest.xfail(str(exc))
    use_lean_modules(model)
    params = handle.trainable(model)
    before = {k: p.detach().clone() for k, p in params.items()}
    losses = _train_two_steps(model, params)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert any(not torch.equal(before[k], p) for k, p in params.items()), "no trainable tensor moved"
    _nudge(params)
    model.eval()
    expected = _logits(model)

    if method.WHOLE_MODEL:
        OUTCOMES[name, method_name] = "trains"
        return
    save_adapter(model, handle, tmp_path / "a")
    again = tiny_model(name, VOCAB)
    load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(_logits(again), expected, rtol=1e-5, atol=1e-5)
    outcome = ["trains, saves, loads"]

    if method_name in PEFT_LOADS:
        peft = pytest.importorskip("peft")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(tiny_model(name, VOCAB), tmp_path / "a").eval()
        logits = _logits(theirs)[:, -expected.shape[1]:]  # PEFT's prompt tuning returns its virtual positions too
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        outcome.append("PEFT")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # QLoRA's: the merge holds the dequantized base
            handle.merge(model)
    except UserError:
        pass
    else:
        torch.testing.assert_close(_logits(model), expected, rtol=1e-4, atol=1e-4)
        outcome.append("merges")
    OUTCOMES[name, method_name] = ", ".join(outcome)


@pytest.fixture(scope="module", autouse=True)
def _write_support_table():
    yield
    if os.environ.get("TUNEFORGE_MODELS_MD") != "1":
        return
    rows = ["| family | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for name in FAMILIES:
        cells = []
        for m in METHODS:
            outcome = OUTCOMES.get((name, m), "not run")
            cells.append("refused" if outcome.startswith("refused") else outcome)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    path = REPO / "docs" / "models.md"
    text = path.read_text() if path.exists() else ""
    start, end = "<!-- support table: start -->", "<!-- support table: end -->"
    if start in text:
        text = text[:text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end):]
        path.write_text(text)


def test_feature_based_fine_tuning_runs_on_an_encoder_whose_tokenizer_has_no_eos(tmp_path):
    """An encoder's tokenizer ends its texts with SEP and has no EOS (BERT's): the classification examples take
    SEP for the answer's end, which features never reads, where the data were refused for want of an EOS."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertLMHeadModel, PreTrainedTokenizerFast

    import tuneforge
    from tuneforge.core import config

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted(set("good fine great lovely bad awful poor dull film number "
                                                              "positive negative text answer".split()))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                        sep_token="[SEP]")
    assert tokenizer.eos_token_id is None and not tokenizer.chat_template
    bert = BertLMHeadModel(BertConfig(vocab_size=len(words), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128))
    good, bad = "good fine great lovely".split(), "bad awful poor dull".split()
    rows = [{"text": f"{a} {b} film", "label": lab} for lab, group in (("positive", good), ("negative", bad))
            for a in group for b in group[:3]]  # 12 texts a label, each its own tokens
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.from_dict({"method": {"name": "features", "layer": -1},
                            "data": {"path": str(tmp_path / "d.jsonl"), "format": "classification",
                                     "val_fraction": 0.25},
                            "train": {"output_dir": str(tmp_path / "run"), "device": "cpu"}})
    result = tuneforge.train(cfg, model=bert, tokenizer=tokenizer)
    assert (tmp_path / "run" / "final").is_dir() and 0 <= result["after"]["accuracy"] <= 1


def test_an_encoder_is_refused_for_gradient_methods_and_named_features(tmp_path, tiny_tokenizer):
    """A BERT folder loads as a "causal" head (BertLMHeadModel), but its attention reads the whole text:
    next-token training would learn from the answer it is asked for. One line, before any data is read."""
    from transformers import BertConfig, BertLMHeadModel

    import tuneforge
    from tuneforge.core import config

    bert = BertLMHeadModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128))
    (tmp_path / "never-read.jsonl").write_text("not JSON: reading it would fail\n")  # it exists, so only reading fails
    cfg = config.from_dict({"method": {"name": "lora"}, "data": {"path": str(tmp_path / "never-read.jsonl")},
                            "train": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(UserError, match="is an encoder.*method.name: features"):
        tuneforge.train(cfg, model=bert, tokenizer=tiny_tokenizer)
    assert not (tmp_path / "run").exists()
