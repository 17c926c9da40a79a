"""The estimate on the tiny model: parameter counts, memory parts against hand counts and against
what autograd really keeps, the longest batch taken from the data, and refusals before loading."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from test_run import sentiment_rows, write_jsonl
from tuneforge import cli
from tuneforge.core import config
from tuneforge.data import Collator
from tuneforge.training.estimate import Shape, batch_shapes, estimate, saved_bytes
from tuneforge.eval.lm import label_loss
from tuneforge.model.kernels import use_lean_modules
from tuneforge.methods import lora
from tuneforge.methods.registry import REGISTRY


def test_estimate_counts_parameters_and_state_without_loading_weights(tiny_dir):
    cfg = config.from_dict({"model": str(tiny_dir), "data": {"max_length": 32}, "train": {"batch_size": 2}})
    est = estimate(cfg, n_examples=10, flops_per_s=1e9)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert est.total_params == est.trainable_params == n
    assert 4 * n <= est.parts["weights"] < 4 * n + 1024  # parameters, plus small buffers (rotary frequencies)
    assert est.parts["train_state"] == 12 * n  # gradient + two AdamW moments
    assert est.steps == 5 and est.tokens_per_step == 64 and est.step_seconds > 0
    assert est.longest == Shape(2, 32, 0, 64) and est.peak_bytes == sum(est.parts.values())
    assert "trainable" in est.describe()


def test_freezing_layers_lowers_the_estimate(tiny_dir):
    base = {"model": str(tiny_dir)}
    all_layers = estimate(config.from_dict(base), flops_per_s=1e9)
    frozen = estimate(config.from_dict({**base, "method": {"name": "full", "freeze_layers": 1}}), flops_per_s=1e9)
    assert frozen.trainable_params < all_layers.trainable_params
    assert frozen.step_seconds < all_layers.step_seconds
    assert frozen.peak_bytes < all_layers.peak_bytes


def test_a_bf16_run_s_estimate_counts_its_held_layers_at_two_bytes(tiny_dir):
    """The frozen linear layers a bf16 run holds in bf16 count 2 bytes a weight; not where the caller's model
    stays as given, nor where full fine-tuning saves the whole model."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    held = sum(m.weight.numel() for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and name != "lm_head" and m.weight is not model.lm_head.weight)
    lora_run = {"model": str(tiny_dir), "method": {"name": "lora", "r": 2}}
    fp32 = estimate(config.from_dict(lora_run), flops_per_s=1e9).parts["weights"]
    bf16 = config.from_dict({**lora_run, "train": {"precision": "bf16"}})
    assert estimate(bf16, flops_per_s=1e9).parts["weights"] == fp32 - 2 * held
    assert estimate(bf16, flops_per_s=1e9, holds_frozen=False).parts["weights"] == fp32
    full = {"model": str(tiny_dir), "method": {"name": "full", "freeze_layers": 1}}
    assert (estimate(config.from_dict({**full, "train": {"precision": "bf16"}}), flops_per_s=1e9).parts["weights"]
            == estimate(config.from_dict(full), flops_per_s=1e9).parts["weights"])


@pytest.mark.parametrize("shared", [0, 6])
def test_saved_bytes_on_the_meta_device_are_what_the_real_step_keeps(tiny, shared):
    """The estimate counts activations by running the step's forward on the meta device; the real step
    on real tensors, with a shared prefix or without, keeps about as much (the padding mask aside)."""
    model, _ = tiny
    cfg = lora.Config(r=4, lora_dropout=0.1, target_modules="all-linear")
    lora.inject(model, cfg)
    use_lean_modules(model)
    from tuneforge.training.estimate import _meta_model

    meta, _, _ = _meta_model(config.from_dict({"method": {"name": "lora", "r": 4, "lora_dropout": 0.1,
                                                           "target_modules": "all-linear"}}), model.config)
    rows, width = 4, 20
    ids = torch.randint(3, 259, (rows, width), generator=torch.Generator().manual_seed(0))
    ids[:, :shared] = ids[0, :shared]
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    counted = {}
    params = {id(p) for p in model.parameters()}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params:
            counted[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        label_loss(model, ids, torch.ones_like(ids), labels)
    real = sum(counted.values())
    predicted = saved_bytes(meta, Shape(rows, width, shared, 2 * rows))
    head = 4 * (2 * rows) * (64 + 2 + 1)  # the head's own: the kept hidden states, targets and log-sum-exps
    assert 0.9 * real <= predicted + head <= 1.1 * real, (predicted + head, real)


def test_the_longest_batch_and_its_shared_prefix_come_from_the_data(tiny_tokenizer):
    from tuneforge.data import Example

    prefix = [5, 6, 7, 8, 9]
    examples = [Example(prefix + [10 + i] * (i + 1), [-100] * (5 + i) + [10 + i]) for i in range(6)]
    shapes = batch_shapes(examples, [[0, 1], [4, 5], [3]], pad_id=0)
    assert shapes == [Shape(2, 7, 4, 2), Shape(2, 11, 5, 2), Shape(1, 9, 0, 1)]  # position 4 predicts a label
    assert Collator(0)([examples[5]])["input_ids"].shape == (1, 11)


def test_cli_estimate_writes_json_and_train_refuses_what_cannot_fit(tmp_path, tiny_dir, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(12))
    raw = {"model": str(tiny_dir), "method": {"name": "lora", "r": 4},
           "data": {"path": str(data), "format": "classification", "group_by_length": True},
           "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "batch_size": 4, "device": "cpu"}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw))
    assert cli.main(["estimate", str(path), "--json", str(tmp_path / "e.json")]) == 0
    est = json.loads((tmp_path / "e.json").read_text())
    assert {"peak_memory_bytes", "step_seconds", "run_seconds", "parts"} <= est.keys()
    assert est["longest"]["rows"] == 4 and est["longest"]["shared"] > 10  # the chat template's system turn
    assert est["peak_memory_bytes"] == sum(est["parts"].values())
    import tuneforge.training.run as run_module

    assert "does not fit" not in capsys.readouterr().out
    monkeypatch.setattr(run_module, "available_memory", lambda device: 2**20)  # a machine with 1 MiB
    assert cli.main(["estimate", str(path)]) == 0  # estimate says so, and what lowers it
    assert "it does not fit: the run needs about" in capsys.readouterr().out.splitlines()[-1]
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "--force" in err and not (tmp_path / "out" / "checkpoints").exists()
    assert cli.main(["train", str(path), "--force", "--overwrite"]) == 0


@pytest.mark.parametrize("largest,words", [("train_state", "a smaller method.r"), ("weights", "qlora"),
                                            ("activations", "train.gradient_checkpointing")])
def test_a_run_that_does_not_fit_is_told_what_lowers_its_largest_part(monkeypatch, capsys, largest, words):
    """A rank of 100,000 once got the advice to lower the batch size."""
    import tuneforge.training.run as run_module
    from tuneforge.core.errors import UserError
    from tuneforge.training.estimate import Estimate

    parts = {"process": 2**28, "weights": 2**29, "train_state": 2**29, "activations": 2**29, largest: 2**32}
    monkeypatch.setattr(run_module, "available_memory", lambda device: 2**31)
    with pytest.raises(UserError) as err:
        run_module.check_fits(Estimate(10, 5, parts), force=False)
    line = err.value.line()
    assert f"the largest part is {largest.replace('_', ' ')}, 4.00 GiB" in line and words in line and "--force" in line
    run_module.check_fits(Estimate(10, 5, parts), force=True)


@pytest.mark.parametrize("name", sorted(n for n, m in REGISTRY.items() if m.KIND == "gradient"))
def test_every_gradient_method_is_estimated_from_its_batches(tiny_dir, name):
    """What a run prints before it trains: each method's forward on the meta device, a shared prefix
    included (the virtual-token methods widen the padding mask, and the probe passes none)."""
    cfg = config.from_dict({"model": str(tiny_dir), "method": {"name": name}})
    est = estimate(cfg, [Shape(4, 20, 6, 8)], n_examples=4, flops_per_s=1e9)
    assert est.parts["activations"] > 0 and est.trainable_params > 0


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gpt_oss", "gpt2", "falcon", "gemma2", "qwen3_5_text"])
def test_every_family_gets_an_estimate(name):
    """Where the meta forward cannot run the model (MoE kernels; GPT-2's padding check and Falcon's mask,
    in some transformers releases) the activations come from the config's shapes, and the estimate says
    so; it never raises."""
    from families import tiny_config

    for method in ("lora", "full", "prompt"):
        est = estimate(config.from_dict({"method": {"name": method}, "data": {"max_length": 32}}),
                       model_config=tiny_config(name), flops_per_s=1e9)
        assert est.parts["activations"] > 0 and est.step_seconds > 0
        if name in ("qwen3_moe", "mixtral", "gpt_oss"):
            assert est.basis == "config shapes"
        if name in ("gemma2", "qwen3_5_text"):
            assert est.basis == "meta forward"
        assert ("activations from the config shapes" in est.describe()) == (est.basis == "config shapes")


def test_a_moe_step_counts_the_routed_experts_only_and_memory_all():
    from families import tiny_config

    def of(experts: int, routed: int):
        model_config = tiny_config("mixtral")
        model_config.num_local_experts, model_config.num_experts_per_tok = experts, routed
        return estimate(config.from_dict({"method": {"name": "lora"}, "data": {"max_length": 32}}),
                        model_config=model_config, flops_per_s=1e9)

    two_of_four, two_of_two, four_of_four = of(4, 2), of(2, 2), of(4, 4)
    # 2 routed of 4 is the work of 2 of 2, but for the router's two more rows (4 x hidden against 2 x hidden)
    assert two_of_four.flops_per_step == pytest.approx(two_of_two.flops_per_step, rel=3e-3)
    assert four_of_four.flops_per_step > 1.2 * two_of_four.flops_per_step
    assert two_of_four.parts["weights"] == four_of_four.parts["weights"] > two_of_two.parts["weights"]


def test_force_skips_the_estimate_and_a_failing_estimate_does_not_block(tiny_dir, tmp_path, monkeypatch, capsys):
    from tuneforge.training import run as run_mod

    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, sentiment_rows(16))
    cfg = config.from_dict({"model": str(tiny_dir), "data": {"path": str(rows), "format": "classification",
                                                             "max_eval_examples": 4},
                            "train": {"max_steps": 1, "batch_size": 4, "output_dir": str(tmp_path / "a")}})

    def broken(*a, **k):
        raise RuntimeError("a kernel with no meta form")

    monkeypatch.setattr(run_mod, "run_estimate", broken)
    run_mod.run(cfg, progress=False)
    assert "no estimate for this model (RuntimeError: a kernel with no meta form); training goes on" in \
        capsys.readouterr().err
    run_mod.run(config.from_dict({**config.to_dict(cfg), "train": {**config.to_dict(cfg)["train"],
                                                                   "output_dir": str(tmp_path / "b")}}),
                progress=False, force=True)
    assert "the estimate is skipped (--force)" in capsys.readouterr().err
