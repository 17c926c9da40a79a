import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tuneforge.core.config import TrainCfg
from tuneforge.eval.classify import classification_metrics, metrics_from_confusion, score_labels, wilson_interval
from tuneforge.eval.lm import label_loss, length_batches
from tuneforge.eval.evaluator import Evaluator
from tuneforge.methods import full
from tuneforge.training import checkpoint
from tuneforge.training.loop import enable_checkpointing, train
from tuneforge.training.optim import lr_multiplier, param_groups

VOCAB = 40


@dataclass(frozen=True)
class Row:
    input_ids: list
    labels: list


def synthetic_examples(n: int, seed: int = 0) -> list[Row]:
    """Rows of varying length whose last three tokens carry the loss."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows.append(Row(ids, [-100] * (length - 3) + ids[-3:]))
    return rows


def collate(rows) -> dict:
    width = max(len(r.input_ids) for r in rows)
    pad = lambda seq, v: seq + [v] * (width - len(seq))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r.input_ids, 0) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r.input_ids), 0) for r in rows]),
            "labels": torch.tensor([pad(r.labels, -100) for r in rows])}


def tiny_full(seed=1):
    """The tiny model with every weight trainable, and its trainable parameters."""
    from conftest import make_tiny_model

    model = make_tiny_model(VOCAB, seed=seed)
    return model, full.inject(model, full.Config()).trainable(model)


def test_label_loss_equals_full_vocabulary_cross_entropy():
    model, _ = tiny_full()
    batch = collate(synthetic_examples(5))
    loss, n = label_loss(model, **batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                                ignore_index=-100, reduction="sum")
    assert n == 15 and torch.allclose(loss, reference, rtol=1e-5)


def test_score_labels_matches_hand_computed_log_likelihood():
    model, _ = tiny_full()
    prompts, answers = [[5, 6, 7], [8, 9]], [[10], [11, 12]]
    scores = score_labels(model, prompts, answers, batch_size=3)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, a in enumerate(answers):
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0], -1)
                expected = sum(logp[len(p) - 1 + k, tok] for k, tok in enumerate(a))
                assert scores[i, j].item() == pytest.approx(expected.item(), abs=1e-4)
    single = score_labels(model, prompts, [[10], [11]])  # the one-forward path for one-token answers
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompts[1]])).logits[0, -1], -1)
    assert single[1].tolist() == pytest.approx([logp[10].item(), logp[11].item()], abs=1e-5)


@pytest.mark.parametrize("answers", [[[10], [11]], [[10], [11, 12]]])
def test_score_labels_runs_the_prefix_every_prompt_shares_once_and_scores_as_the_plain_model(answers):
    """Prompts beginning with the same six tokens, in batches of two: the prefix's keys and values are computed
    once for the set, and every score equals the model's own forward over the whole sequence."""
    model, _ = tiny_full()
    head = [20, 21, 22, 23, 24, 25]
    prompts = [head + tail for tail in ([5, 6, 7], [8, 9], [30], [31, 32, 33, 34], [35, 36])]
    calls = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    scores = score_labels(model, prompts, answers, batch_size=2)
    hook.remove()
    assert calls[0] == (1, 6) and all(shape[1] < 6 + 5 for shape in calls[1:])  # the prefix once, then the rest
    assert len(calls) == 1 + -(-len(prompts) * (1 if len(answers[1]) == 1 else 2) // 2)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for j, a in enumerate(answers):
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + a])).logits[0], -1)
                expected = sum(logp[len(prompt) - 1 + k, tok] for k, tok in enumerate(a))
                assert scores[i, j].item() == pytest.approx(expected.item(), abs=1e-4)


def test_length_batches_fill_a_token_budget_with_rows_of_similar_length():
    lengths = [7, 3, 12, 3, 5, 30, 4, 6, 6, 2]
    batches = length_batches(lengths, 2, tokens=12)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row once
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)  # shortest first
    for b in batches:  # within the budget, padded to the longest; a longer row alone
        assert len(b) * max(lengths[i] for i in b) <= 12 or len(b) == 1
    for b, following in zip(batches, batches[1:]):  # a batch closes only when its next row would not fit
        assert (len(b) + 1) * lengths[following[0]] > 12
    assert [len(b) for b in batches] == [3, 2, 2, 1, 1, 1] and batches[-1] == [5]  # 2 3 3 | 4 5 | 6 6 | 7 | 12 | 30
    assert length_batches(lengths, 4) == [[9, 1, 3, 6], [4, 7, 8, 0], [2, 5]]  # no budget: fixed counts, by length
    assert length_batches([], 3, 8) == []


@pytest.mark.parametrize("answers", [[[10], [11]], [[10], [11, 12]]])
def test_score_labels_under_a_token_budget_scores_as_in_batches_of_one(answers):
    model, _ = tiny_full()
    head = [20, 21, 22, 23, 24, 25]
    prompts = [head + tail for tail in ([5, 6, 7], [8, 9], [30], [31, 32, 33, 34], [35, 36], [9] * 11)]
    calls = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    budgeted = score_labels(model, prompts, answers, batch_size=1, batch_tokens=24)
    hook.remove()
    assert calls[0] == (1, len(head))  # the shared beginning once, then whole rows of it and their own tokens
    assert all(rows * (len(head) + width) <= 24 or rows == 1 for rows, width in calls[1:])
    assert max(rows for rows, _ in calls) > 1
    assert torch.allclose(budgeted, score_labels(model, prompts, answers, batch_size=1), atol=1e-5)


@pytest.mark.parametrize("name, use_dora", [("llama", False), ("llama", True), ("qwen2", False)])
def test_frozen_linears_held_in_the_autocast_dtype_compute_the_same_step(name, use_dora):
    """Under bf16 autocast, a LoRA step over a base whose frozen linear layers are held in bf16 gives the same
    loss and gradients, to the bit, as over the float32 base (autocast casts those weights the same way); the
    head, a tied weight and a DoRA base stay float32, and nothing changes in fp32."""
    import copy

    from families import tiny_config
    from transformers import AutoModelForCausalLM

    from tuneforge.methods import lora
    from tuneforge.training.precision import hold_frozen_linears

    torch.manual_seed(0)  # qwen2's head a weight of its own, llama's the embeddings'
    base = AutoModelForCausalLM.from_config(tiny_config(name, tie_word_embeddings=name == "llama"))
    lora.inject(base, lora.Config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora))
    held = copy.deepcopy(base)
    cpu = torch.device("cpu")
    assert hold_frozen_linears(held, "fp32", cpu) == 0 and hold_frozen_linears(held, "auto", cpu) == 0
    freed = hold_frozen_linears(held, "bf16", cpu)
    linears = {n: m for n, m in held.named_modules() if type(m) is torch.nn.Linear}
    halved = {n for n, m in linears.items() if m.weight.dtype == torch.bfloat16}
    assert freed == sum(2 * p.numel() for n in halved for p in linears[n].parameters())
    assert "model.layers.0.mlp.down_proj" in halved and "model.layers.0.self_attn.k_proj" in halved
    assert not any(n.endswith(("lora_A.default", "lora_B.default", "lora_A", "lora_B")) for n in halved)
    assert "lm_head" not in halved and held.model.embed_tokens.weight.dtype == torch.float32
    assert ("model.layers.0.self_attn.q_proj.base_layer" in halved) is not use_dora
    batch = {"input_ids": torch.randint(3, 300, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    figures = []
    for model in (base, held):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = label_loss(model, **batch)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        figures.append((loss.detach(), grads))
    (loss0, grads0), (loss1, grads1) = figures
    assert torch.equal(loss0, loss1) and len(grads0) == len(grads1) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))


def test_classification_metrics():
    m = classification_metrics([0, 1, 1, 1], [0, 1, 0, 1], 2)
    assert m.accuracy == 0.75 and m.confusion == [[1, 1], [0, 2]]
    assert m.macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)


def test_metrics_from_confusion_match_scikit_learn_and_parts_combine():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    gold, predicted = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    predicted[gold == 2] = 0  # label 2 is gold but never predicted; label 3 neither
    whole = classification_metrics(predicted, gold, 4)
    assert whole.macro_f1 == pytest.approx(f1_score(gold, predicted, labels=[0, 1, 2, 3], average="macro",
                                                    zero_division=0))
    halves = [classification_metrics(predicted[s], gold[s], 4) for s in (slice(0, 20), slice(20, 50))]
    summed = metrics_from_confusion((np.array(halves[0].confusion) + np.array(halves[1].confusion)).tolist())
    assert summed == whole


def test_wilson_interval_bounds_where_the_normal_test_just_rejects():
    z = 1.96
    for correct, n in ((92, 100), (0, 10), (10, 10), (367, 400)):
        lo, hi = wilson_interval(correct, n, z)
        p_hat = correct / n
        # the interval's ends are the proportions p at which |p_hat - p| = z * sqrt(p (1 - p) / n)
        for end in (lo, hi):
            if 1e-9 < end < 1 - 1e-9:
                assert abs(p_hat - end) == pytest.approx(z * math.sqrt(end * (1 - end) / n), rel=1e-9)
        assert lo <= p_hat <= hi
    assert wilson_interval(0, 10)[0] == pytest.approx(0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1, abs=1e-12)
    assert wilson_interval(92, 100) == pytest.approx((0.8500, 0.9589), abs=1e-4)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)


def test_schedules():
    assert lr_multiplier(0, 10, 2, "cosine") == 0.5 and lr_multiplier(1, 10, 2, "cosine") == 1.0
    assert lr_multiplier(2, 10, 2, "cosine") == 1.0
    assert lr_multiplier(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_multiplier(10, 10, 0, "cosine") == pytest.approx(0.0)
    assert lr_multiplier(7, 10, 0, "constant") == 1.0


def test_weight_decay_on_matrices_only():
    _, params = tiny_full()
    groups = param_groups(params, 0.1)
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_accumulation_gives_the_token_mean_of_the_whole_step(tmp_path):
    """Two micro-batches of 4 take the same step as one batch of 8 (loss normalized per token,
    not per micro-batch: the halves carry 4 and 20 loss tokens). Rows of one length, so that
    padding cannot change the arithmetic."""
    rows = [Row(r.input_ids[:6], [-100] * (5 if i < 4 else 1) + r.input_ids[5 if i < 4 else 1:6])
            for i, r in enumerate(synthetic_examples(8))]
    results = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model, params = tiny_full()
        cfg = TrainCfg(batch_size=batch_size, grad_accum=accum, max_steps=1, learning_rate=1e-2, max_grad_norm=0)
        train(model, params, rows, collate, cfg, tmp_path / f"{batch_size}", batch_order=lambda e: [list(range(8))[
            i:i + batch_size] for i in range(0, 8, batch_size)], progress=False)
        results.append(torch.cat([p.detach().flatten() for p in params.values()]))
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    model, params = tiny_full()
    rows = synthetic_examples(16)
    from tuneforge.eval.lm import evaluate_lm

    before = evaluate_lm(model, rows, collate)["loss"]
    evaluator = Evaluator(lambda m: evaluate_lm(m, rows, collate))
    summary = train(model, params, rows, collate,
                    TrainCfg(batch_size=8, max_steps=30, learning_rate=3e-3, eval_steps=10, logging_steps=5),
                    tmp_path, evaluator=evaluator, progress=False)
    after = evaluate_lm(model, rows, collate)["loss"]
    assert after < before * 0.8
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20, 30]
    assert summary.steps == 30 and summary.best_eval["loss"] == pytest.approx(after, rel=1e-5)
    assert summary.peak_memory_mb > 0 and summary.tokens > 0


def test_early_stopping(tmp_path):
    model, params = tiny_full()
    rows = synthetic_examples(8)
    worse = iter(range(100))
    evaluator = Evaluator(lambda m: {"loss": float(next(worse))})  # never improves after the first
    summary = train(model, params, rows, collate,
                    TrainCfg(batch_size=4, max_steps=50, eval_steps=1, early_stopping_patience=3), tmp_path,
                    evaluator=evaluator, progress=False)
    assert summary.stopped == "early_stop" and summary.steps == 4


def test_keeps_the_last_k_checkpoints(tmp_path):
    model, params = tiny_full()
    train(model, params, synthetic_examples(8), collate,
          TrainCfg(batch_size=4, max_steps=6, save_steps=1, keep_checkpoints=2), tmp_path, progress=False)
    assert [p.name for p in checkpoint.complete(tmp_path / "checkpoints")] == ["step-0000005", "step-0000006"]


def test_a_checkpoint_resumes_into_the_optimizer_s_own_kernel(tmp_path):
    """A checkpoint whose optimizer ran one tensor at a time (as tuneforge's CPU runs did before its update was
    fused) resumes into a fused optimizer as a fused one, and the other way round: the saved groups' kernel
    choice is not taken over; the moments and step are."""
    from tuneforge.training.optim import make_optimizer

    for saved_fused, live_fused in ((None, True), (True, None)):
        torch.manual_seed(0)
        params = {"w": torch.nn.Parameter(torch.randn(4, 3)), "b": torch.nn.Parameter(torch.randn(3))}
        before = torch.optim.AdamW(param_groups(params, 0.01), lr=1e-2, fused=saved_fused)
        for p in params.values():
            p.grad = torch.ones_like(p)
        before.step()
        scheduler = torch.optim.lr_scheduler.LambdaLR(before, lambda s: 1.0)
        tensors = {k: p.detach().clone() for k, p in params.items()}
        path = checkpoint.save(tmp_path / str(saved_fused), 1, tensors, checkpoint.named_optimizer(before, params),
                               scheduler, {}, 1, None, torch.amp.GradScaler("cpu", enabled=False))
        live = make_optimizer(params, 1e-2, 0.01) if live_fused else torch.optim.AdamW(param_groups(params, 0.01))
        saved = checkpoint.read(path, params, {k: p.shape for k, p in params.items()})
        checkpoint.restore(saved, params, live, torch.optim.lr_scheduler.LambdaLR(live, lambda s: 1.0))
        assert all(g["fused"] is live_fused for g in live.param_groups)
        assert all(torch.equal(live.state[p]["exp_avg"], before.state[p]["exp_avg"]) for p in params.values())
        assert int(live.state[params["w"]]["step"]) == 1
        live.step()  # the restored state runs in the live kernel


def _run_script(out: Path, kill_after: int, mode: str) -> subprocess.CompletedProcess:
    script = Path(__file__).parent / "train_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process tiny-model tests (see conftest)
    return subprocess.run([sys.executable, str(script), str(out), str(kill_after), mode], capture_output=True,
                          text=True, timeout=120, env=env)


def test_resume_after_sigkill_reaches_the_uninterrupted_weights(tmp_path):
    straight = _run_script(tmp_path / "straight", -1, "fresh")
    assert straight.returncode == 0, straight.stderr
    killed = _run_script(tmp_path / "crash", 5, "fresh")  # killed one step after the step-4 checkpoint
    assert killed.returncode == -9
    assert [p.name for p in checkpoint.complete(tmp_path / "crash" / "checkpoints")][-1] == "step-0000004"
    resumed = _run_script(tmp_path / "crash", -1, "resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "straight" / "weights.safetensors")
    b = load_file(tmp_path / "crash" / "weights.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    steps = [json.loads(l)["step"] for l in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the lost step was logged once, not twice


def test_ctrl_c_writes_a_checkpoint_then_exits(tmp_path):
    model, params = tiny_full()

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, params, synthetic_examples(8), collate,
              TrainCfg(batch_size=4, max_steps=10), tmp_path, on_step=interrupt, progress=False)
    assert checkpoint.complete(tmp_path / "checkpoints")[-1].name == "step-0000003"


def test_gradient_checkpointing_gives_the_same_gradients_with_a_frozen_base():
    """Recomputing activations in backward changes memory, not the gradients, also when only
    LoRA's tensors train (the base's inputs then need no gradient of their own)."""
    from conftest import make_tiny_model

    from tuneforge.methods import lora

    grads = []
    for checkpointing in (False, True):
        model = make_tiny_model(VOCAB, seed=1)
        adapter = lora.inject(model, lora.Config(r=2, target_modules="all-linear", init_lora_weights=False))
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        loss, n = label_loss(model, **collate(synthetic_examples(4)))
        (loss / n).backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapter.trainable(model).values()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
