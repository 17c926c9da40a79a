"""The one training loop: every method hands it a model and that model's trainable parameters.

Plain PyTorch: AdamW (decay on matrices only), warm-up then cosine/linear decay, gradient
accumulation with an exact token-level mean, clipping, bf16 autocast on CUDA, periodic evaluation
with optional early stopping, metrics.jsonl, atomic checkpoints with exact resume, and Ctrl-C
saving a checkpoint before it exits.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from tuneforge.config import TrainCfg
from tuneforge.eval.evaluator import Evaluator
from tuneforge.eval.lm import label_loss
from tuneforge.training import checkpoint
from tuneforge.training.optim import lr_multiplier, make_optimizer

BatchOrder = Callable[[int], list[list[int]]]  # epoch -> lists of example indices


@dataclass
class Summary:
    steps: int = 0
    tokens: int = 0  # tokens seen (input positions)
    loss_tokens: int = 0  # tokens that carried loss
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0
    final_loss: float | None = None
    first_eval: dict = field(default_factory=dict)  # before the first step (train.eval_at_start)
    best_eval: dict = field(default_factory=dict)  # the best evaluation by the evaluator's metric
    final_eval: dict = field(default_factory=dict)  # the last one: of the weights the run ends with
    stopped: str = "finished"  # finished | early_stop | time_budget | interrupted

    def as_dict(self) -> dict:
        return asdict(self)


def shuffled_batches(n: int, batch_size: int, seed: int) -> BatchOrder:
    """Each epoch a fresh permutation, seeded by (seed, epoch), so resuming rebuilds the same order."""

    def order(epoch: int) -> list[list[int]]:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        return [perm[i:i + batch_size] for i in range(0, n, batch_size)]

    return order


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return torch.autocast(device.type, dtype=dtype), scaler


def train(model: nn.Module, params: dict[str, nn.Parameter], examples: Sequence, collate, cfg: TrainCfg,
          out_dir: str | Path, *, batch_order: BatchOrder | None = None, evaluator: Evaluator | None = None,
          resume: bool = False, on_step: Callable[[int], None] | None = None, progress: bool = True) -> Summary:
    """Train ``params`` of ``model`` on ``examples`` (each with ``input_ids`` and ``labels``).

    Writes ``metrics.jsonl`` and ``checkpoints/`` under ``out_dir``. With ``resume`` it continues
    from the latest complete checkpoint and reaches the same weights as an uninterrupted run.
    ``on_step(step)`` is called after each optimizer step and any checkpoint it wrote.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    device = next(iter(params.values())).device
    torch.manual_seed(cfg.seed)
    batch_order = batch_order or shuffled_batches(len(examples), cfg.batch_size, cfg.seed)
    batches_per_epoch = len(batch_order(0))
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
    else:
        total_steps = max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))

    optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, cfg.warmup_steps, cfg.lr_schedule))
    autocast, scaler = _autocast(device, cfg.precision)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)

    state = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "loss_tokens": 0, "best": None, "bad_evals": 0,
             "seconds": 0.0}
    metrics_path = out_dir / "metrics.jsonl"
    if resume and (done := checkpoint.complete(ckpt_dir)):
        state.update(checkpoint.load(done[-1], params, optimizer, scheduler))
        _truncate_metrics(metrics_path, state["step"])
        print(f"tuneforge: resuming from {done[-1].name}", file=sys.stderr)
    elif metrics_path.exists():
        metrics_path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)

    def save_checkpoint():
        checkpoint.save(ckpt_dir, state["step"], params, optimizer, scheduler,
                        {k: v for k, v in state.items() if k != "step"}, cfg.keep_checkpoints)

    def log(record: dict):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def next_batch():
        order = batch_order(state["epoch"])
        if state["batch"] >= len(order):
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
            order = batch_order(state["epoch"])
        indices = order[state["batch"]]
        state["batch"] += 1
        return collate([examples[i] for i in indices])

    summary = Summary()
    if evaluator and cfg.eval_at_start and state["step"] == 0:  # the "before" of before/after, at step 0
        started = time.perf_counter()
        summary.first_eval = {**evaluator.run(model), "seconds": time.perf_counter() - started}
        log({"step": 0, **{f"eval_{k}": v for k, v in summary.first_eval.items() if isinstance(v, (int, float))}})
    bar = _progress_bar(total_steps, state["step"], progress)
    model.train()
    started, start_tokens, start_seconds = time.perf_counter(), state["tokens"], state["seconds"]
    window_loss, window_tokens = 0.0, 0
    try:
        while state["step"] < total_steps:
            position = (state["epoch"], state["batch"])  # where this step starts, for Ctrl-C
            batches = [{k: v.to(device) for k, v in next_batch().items()} for _ in range(cfg.grad_accum)]
            n_loss = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            step_loss = 0.0
            for batch in batches:
                with autocast:
                    loss_sum, _ = label_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                loss = loss_sum / max(n_loss, 1)
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss.item()
                state["tokens"] += int(batch["attention_mask"].sum())
            state["loss_tokens"] += n_loss
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
            scaler.step(optimizer) if scaler else optimizer.step()
            if scaler:
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            state["seconds"] = start_seconds + time.perf_counter() - started
            window_loss, window_tokens = window_loss + step_loss * n_loss, window_tokens + n_loss
            summary.final_loss = step_loss
            tok_s = (state["tokens"] - start_tokens) / max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{tok_s:.0f}")

            last = state["step"] == total_steps
            if state["step"] % max(cfg.logging_steps, 1) == 0 or last:
                log({"step": state["step"], "epoch": state["epoch"], "loss": window_loss / max(window_tokens, 1),
                     "lr": scheduler.get_last_lr()[0], "tokens": state["tokens"], "tokens_per_s": tok_s,
                     "seconds": state["seconds"]})
                window_loss, window_tokens = 0.0, 0
            stop = None
            over_budget = cfg.time_budget_s is not None and state["seconds"] >= cfg.time_budget_s
            if evaluator and ((cfg.eval_steps and state["step"] % cfg.eval_steps == 0) or last or over_budget):
                stop = _evaluate(model, evaluator, state, cfg, log)
            stop = stop or ("time_budget" if over_budget else None)
            if (cfg.save_steps and state["step"] % cfg.save_steps == 0) or last or stop:
                save_checkpoint()
            if on_step:
                on_step(state["step"])
            if stop:
                summary.stopped = stop
                break
    except KeyboardInterrupt:
        # Keep what the finished steps achieved: rewind the data position to the interrupted step.
        state["epoch"], state["batch"] = position
        optimizer.zero_grad(set_to_none=True)
        save_checkpoint()
        bar.close()
        print(f"\ntuneforge: interrupted; checkpoint saved at step {state['step']} (continue with --resume)",
              file=sys.stderr)
        raise
    bar.close()
    model.eval()
    summary.steps, summary.tokens, summary.loss_tokens = state["step"], state["tokens"], state["loss_tokens"]
    summary.seconds = state["seconds"]
    summary.tokens_per_s = (state["tokens"] - start_tokens) / max(time.perf_counter() - started, 1e-9)
    summary.peak_memory_mb = peak_memory_mb(device)
    summary.best_eval = state["best"] or {}
    summary.final_eval = state.get("final") or {}
    return summary


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward. Non-reentrant, so a frozen base whose
    inputs need no gradient still passes gradients to the adapters inside it."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _evaluate(model, evaluator: Evaluator, state: dict, cfg: TrainCfg, log) -> str | None:
    started = time.perf_counter()
    metrics = {**evaluator.run(model), "seconds": time.perf_counter() - started}
    model.train()
    log({"step": state["step"], **{f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}})
    state["final"] = {"step": state["step"], **metrics}
    value = metrics[evaluator.metric]
    best = state["best"]
    if evaluator.better(value, None if best is None else best[evaluator.metric]):
        state["best"], state["bad_evals"] = {"step": state["step"], **metrics}, 0
    else:
        state["bad_evals"] += 1
    if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
        return "early_stop"
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: they will be logged again."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _progress_bar(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)
