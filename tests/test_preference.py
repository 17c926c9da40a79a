"""Preference tuning on the tiny model: DPO, ORPO, SimPO and KTO under every gradient method, the
reference at no second copy, KTO's rows, and the refusals. TRL's numbers: tests/test_preference_trl.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tuneforge
from conftest import make_tiny_tokenizer
from tuneforge.core import config
from tuneforge.core.errors import UserError
from tuneforge.data.preference import PreferencePair, RowsCollator, unpaired
from tuneforge.methods.registry import get_method
from tuneforge.training import objectives
from tuneforge.training.objectives import reference

METHODS = ["full", "lora", "qlora", "adapter", "ia3", "prefix", "prompt", "vera"]


def pairs(n: int = 16) -> list[dict]:
    return [{"prompt": f"Q{i}: what colour is the sky?", "chosen": f" Blue, {i}.", "rejected": f" Green {i}, no."}
            for i in range(n)]


def run(tmp_path, tiny_dir, objective: str, method: str, rows=None, **train) -> tuple[dict, list[dict]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows or pairs()))
    out = tmp_path / f"{objective}-{method}"
    cfg = config.from_dict({
        "model": str(tiny_dir), "method": {"name": method},
        "data": {"path": str(data), "format": "preference", "val_fraction": 0.25},
        "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 4, "learning_rate": 1e-2,
                  "objective": objective, "eval_at_start": True, "logging_steps": 1, **train}})
    summary = tuneforge.train(cfg, progress=False)
    return summary, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_every_gradient_method_trains_under_dpo(tmp_path, tiny_dir, method):
    summary, records = run(tmp_path, tiny_dir, "dpo", method)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    if method != "prefix" and method != "prompt":  # they start away from the base: the reference
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference at the start
        assert summary["before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["after"]["rewards_margin"] > summary["before"]["rewards_margin"]
    assert {"rewards_chosen", "rewards_rejected", "rewards_accuracy", "logps_chosen"} <= records[1].keys()
    assert summary["loss_tokens"] > 2 * 4 * 4  # both answers' tokens of 4 steps of 4 pairs: not the 16 pairs


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_each_objective_lowers_its_loss(tmp_path, tiny_dir, objective, method):
    summary, records = run(tmp_path, tiny_dir, objective, method)
    assert summary["after"]["loss"] < summary["before"]["loss"]
    if objective == "kto":
        assert records[0]["eval_loss"] == pytest.approx(0.5, abs=1e-5)  # 1 - sigmoid(0) at the start
        assert summary["train_examples"] == 24  # 12 pairs, each a desirable and an undesirable example


def test_kto_reads_unpaired_rows_and_dpo_refuses_them(tmp_path, tiny_dir):
    rows = [{"prompt": f"Q{i}: sky?", "completion": f" {'Blue' if i % 2 else 'Green'} {i}.", "label": bool(i % 2)}
            for i in range(16)]
    summary, _ = run(tmp_path, tiny_dir, "kto", "lora", rows)
    assert summary["train_examples"] == 12
    # the answers' tokens (bytes, here: " Blue 7." and its end are 9), not the 4 x 4 examples, nor the KL
    # rows' tokens as well (twice as many)
    assert 16 * 8 <= summary["loss_tokens"] <= 16 * 11, summary["loss_tokens"]
    with pytest.raises(UserError, match="trains on pairs"):
        run(tmp_path / "dpo", tiny_dir, "dpo", "lora", rows)
    with pytest.raises(UserError, match="'label' must be true"):
        run(tmp_path / "bad", tiny_dir, "kto", "lora", [{**rows[0], "label": "yes"}] * 8)


def test_the_adapter_switched_off_is_the_base_and_no_copy(tiny):
    """LoRA's reference is the model it trains, with the adapter off: exactly the base's numbers."""
    model, tok = tiny
    example = PreferencePair(tok("Sky?")["input_ids"], tok(" Blue.")["input_ids"], tok(" Green.")["input_ids"],
                             tok(" Blue.")["input_ids"], tok(" Green.")["input_ids"])
    batch = RowsCollator(tok.pad_token_id)([example])
    args = batch["input_ids"], batch["attention_mask"], batch["labels"]
    base, _ = objectives.sequence_logprobs(model, *args)
    lora = get_method("lora")
    handle = lora.inject(model, lora.Config(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for p in handle.trainable(model).values():
            p.add_(0.1)
    moved, _ = objectives.sequence_logprobs(model, *args)
    assert (moved - base).abs().max() > 1e-3
    off = reference.switched_off(model, handle)(batch, True)
    assert torch.equal(off, base)


def test_full_fine_tuning_computes_the_reference_once_and_caches_it(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    first, records = run(tmp_path / "a", tiny_dir, "dpo", "full")
    assert records[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    cached = list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second, _ = run(tmp_path / "b", tiny_dir, "dpo", "full")
    assert cached[0].stat().st_mtime_ns == stamp
    assert {k: v for k, v in second["after"].items() if k != "seconds"} == \
        pytest.approx({k: v for k, v in first["after"].items() if k != "seconds"})


def test_the_shared_prompt_runs_once_per_pair_with_the_same_numbers(tiny):
    model, tok = tiny
    examples = [PreferencePair(tok(f"A long shared prompt number {i} about the sky?")["input_ids"],
                               tok(f" Blue {i}.")["input_ids"], tok(" Green.")["input_ids"],
                               tok(f" Blue {i}.")["input_ids"], tok(" Green.")["input_ids"]) for i in range(3)]
    batch = RowsCollator(tok.pad_token_id)(examples)
    args = batch["input_ids"], batch["attention_mask"], batch["labels"]
    stats = {}
    shared, counts = objectives.sequence_logprobs(model, *args, share=True, stats=stats, groups=2)
    plain, _ = objectives.sequence_logprobs(model, *args)
    assert stats["shared_tokens"] > 0 and torch.allclose(shared, plain, atol=1e-5)
    assert counts.tolist() == [len(e.chosen_ids) for e in examples] + [len(e.rejected_ids) for e in examples]


def test_kto_pairs_each_answer_with_another_prompts_answer_in_its_batch():
    tok = make_tiny_tokenizer()
    pairs_ = [PreferencePair([i], tok(f" good {i}")["input_ids"], tok(f" bad {i}")["input_ids"],
                             tok(f" good {i}")["input_ids"], tok(f" bad {i}")["input_ids"]) for i in range(4)]
    flat = unpaired(pairs_, batch_size=4)  # two batches: each holds two pairs' chosen, then their rejected
    assert [e.desirable for e in flat] == [True, True, False, False] * 2
    assert [e.prompt_ids for e in flat] == [[0], [1], [0], [1], [2], [3], [2], [3]]
    for block in (flat[:4], flat[4:]):
        assert [e.kl_ids for e in block] == [block[i - 1].completion_ids for i in range(4)]
        for e in block:  # never the prompt's own answers
            own = {tuple(x.completion_ids) for x in block if x.prompt_ids == e.prompt_ids}
            assert tuple(e.kl_ids) not in own


def test_preference_settings_are_checked_at_parse_time():
    base = {"data": {"path": "p.jsonl", "format": "preference"}, "train": {"objective": "dpo"}}
    for key, value, words in [("beta", 0, "beta"), ("label_smoothing", 0.5, "label_smoothing"),
                              ("loss_type", "hinge", "loss_type")]:
        with pytest.raises(UserError, match=words):
            config.from_dict({**base, "train": {**base["train"], key: value}})
    with pytest.raises(UserError, match="packing does not apply"):
        config.from_dict({**base, "data": {**base["data"], "packing": True}})


def test_a_start_adapter_is_merged_and_is_the_reference(tmp_path, tiny_dir):
    """DPO after SFT: the SFT adapter named by train.start_from is merged into the base, so the policy
    and the reference both start from base + SFT (DPO's first loss ln 2), not from the bare base."""
    model, tok = tuneforge.load_model(str(tiny_dir))
    lora = get_method("lora")
    handle = lora.inject(model, lora.Config(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for p in handle.trainable(model).values():
            p.add_(0.05)
    tuneforge.save_adapter(model, handle, tmp_path / "sft")
    summary, records = run(tmp_path, tiny_dir, "dpo", "lora", start_from=str(tmp_path / "sft"))
    assert records[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    bare, _ = run(tmp_path / "bare", tiny_dir, "dpo", "lora")
    assert summary["before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference = base + SFT
    assert summary["before"]["logps_chosen"] != pytest.approx(bare["before"]["logps_chosen"], abs=1e-3)
    with pytest.raises(UserError, match="cannot be merged"):
        run(tmp_path / "prompt", tiny_dir, "dpo", "lora", start_from=str(prompt_adapter(tmp_path, tiny_dir)))


def prompt_adapter(tmp_path, tiny_dir):
    model, _ = tuneforge.load_model(str(tiny_dir))
    prompt = get_method("prompt")
    handle = prompt.inject(model, prompt.Config(num_virtual_tokens=2))
    tuneforge.save_adapter(model, handle, tmp_path / "prompt-adapter")
    return tmp_path / "prompt-adapter"


def test_tuneforge_data_shows_a_pairs_two_rows(tmp_path, tiny_dir, capsys):
    from tuneforge import cli

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(4)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"model": str(tiny_dir), "data": {"path": str(data), "format": "preference"},
                               "train": {"objective": "dpo"}}))
    assert cli.main(["data", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "⟦ Blue, " in out and "⟦ Green " in out  # the chosen row, then the rejected one, each answer marked


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_held_out_pairs_are_scored_in_the_run_s_precision(tiny, precision, dtype):
    """A preference objective's evaluator runs the forward pass in the context a training step runs it."""
    model, tok = tiny
    examples = [PreferencePair(tok(f"Sky {i}?")["input_ids"], tok(" Blue.")["input_ids"], tok(" Green.")["input_ids"],
                               tok(" Blue.")["input_ids"], tok(" Green.")["input_ids"]) for i in range(3)]
    seen = set()
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    loss = objectives.make(config.TrainCfg(objective="simpo"))
    figures = objectives.evaluator(loss, examples, RowsCollator(tok.pad_token_id), 2, precision).run(model)
    assert seen == {dtype} and math.isfinite(figures["loss"]) and figures["examples"] == 3
