"""The one training loop: every method hands it a model and that model's trainable parameters.

Plain PyTorch: AdamW (decay on matrices only), warm-up then cosine/linear decay, gradient
accumulation with an exact token-level mean, clipping, bf16 autocast on CUDA, periodic evaluation
with optional early stopping, metrics.jsonl, atomic checkpoints and exact resume.

What can go wrong mid-run is handled where it happens:
- Ctrl-C or SIGTERM at any moment saves a checkpoint from which ``resume`` reaches exactly the weights
  of an uninterrupted run (``interrupts.py``); an evaluation it cut short runs first on resume.
- A non-finite loss or gradient stops the run at that step (or skips the step, ``skip_nonfinite_steps``
  times at most), naming the batch's source rows; a checkpoint is never written with non-finite weights.
- A full disk stops the run with one line; every checkpoint written before stays whole.

Under torch.distributed (``dist``, from ``training/dist.py``) the same loop runs on every rank: each
step takes ``grad_accum x world`` micro-batches in the order one process would, each rank its share;
the loss is scaled so that DDP's (or FSDP2's) mean over ranks gives the gradient of the global
token-level mean; the step's loss, tokens and non-finite flag are summed across ranks; a signal
stops every rank at the same step boundary; rank 0 alone writes metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from tuneforge.core.config import TrainCfg
from tuneforge.core.errors import RunStopped
from tuneforge.eval.evaluator import Evaluator
from tuneforge.eval.lm import label_loss
from tuneforge.training import checkpoint, metrics
from tuneforge.training.interrupts import Guard, Interrupted
from tuneforge.training.optim import lr_multiplier, make_optimizer

if TYPE_CHECKING:  # torch.distributed's modules load only for a distributed run
    from tuneforge.training.dist import Dist

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
    stopped: str = "finished"  # finished | early_stop | time_budget
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (train.skip_nonfinite_steps)
    shared_prefix_tokens: int = 0  # token positions not computed, because a batch's rows shared a prefix

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
          resume: bool = False, on_step: Callable[[int], None] | None = None, progress: bool = True,
          dist: Dist | None = None) -> Summary:
    """Train ``params`` of ``model`` on ``examples`` (each with ``input_ids``, ``labels`` and, for
    messages, ``source``: the file and line it came from).

    Writes ``metrics.jsonl`` and ``checkpoints/`` under ``out_dir``. With ``resume`` it continues
    from the latest complete checkpoint and reaches the same weights as an uninterrupted run.
    ``on_step(step)`` is called after each optimizer step and any checkpoint it wrote; a
    KeyboardInterrupt it raises stops the run as Ctrl-C does.

    With ``dist``, ``model`` is what ``dist.wrap`` returned and ``params`` that model's trainable
    parameters (shards, when it is sharded); every rank calls ``train`` with the same arguments.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    device = dist.device if dist else next(iter(params.values())).device
    main = dist is None or dist.main  # the process that writes
    world = dist.world if dist else 1
    torch.manual_seed(cfg.seed)
    batch_order = batch_order or shuffled_batches(len(examples), cfg.batch_size, cfg.seed)
    batches_per_epoch = len(batch_order(0))
    total_steps = cfg.steps(batches_per_epoch, world)

    optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, cfg.warmup_steps, cfg.lr_schedule))
    autocast, scaler = _autocast(device, cfg.precision)
    if cfg.gradient_checkpointing:
        enable_checkpointing(dist.unwrap(model) if dist else model)  # DDP's wrapper has no such method

    state = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "loss_tokens": 0, "best": None, "bad_evals": 0,
             "seconds": 0.0, "first": None, "final": None, "pending_eval": False, "skipped": 0,
             "window_loss": 0.0, "window_tokens": 0, "shared_tokens": 0,
             "world": world, "global_batch": cfg.batch_size * cfg.grad_accum * world}
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if resume and (done := checkpoint.complete(ckpt_dir)):
        saved = checkpoint.read(done[-1], params, {k: p.shape for k, p in params.items()})
        if dist and dist.sharded(model):  # every rank reads the whole tensors and keeps its shard
            dist.load_full(model, optimizer, saved.tensors, saved.optimizer)
            progress = checkpoint.restore_rest(saved, scheduler, scaler)
        else:
            progress = checkpoint.restore(saved, params, optimizer, scheduler, scaler)
        state.update({**progress, "world": world, "global_batch": state["global_batch"]})
        if main and (dropped := metrics.truncate_after(metrics_path, state["step"])):
            print(f"tuneforge: metrics.jsonl: dropped {dropped} torn or malformed line(s)", file=sys.stderr)
        if main:
            print(f"tuneforge: resuming from {done[-1].name}", file=sys.stderr)
    elif main:
        metrics_path.unlink(missing_ok=True)

    def save_checkpoint(rng: dict | None = None) -> None:
        finite = all(torch.isfinite(dist.local(p) if dist else p).all() for p in params.values())
        if not (dist.all(finite) if dist else finite):
            raise RunStopped(f"the weights are not finite after step {state['step']}, so no checkpoint is written",
                             str(ckpt_dir), fix=f"lower train.learning_rate (now {cfg.learning_rate:g}); resume "
                                                "from the last checkpoint kept")
        if dist and dist.sharded(model):  # gathered whole on rank 0: every rank takes part
            tensors, named = dist.full_params(model, params), dist.full_optimizer(model, optimizer)
        else:
            tensors, named = params, checkpoint.named_optimizer(optimizer, params) if main else None
        if main:
            checkpoint.save(ckpt_dir, state["step"], tensors, named, scheduler,
                            {k: v for k, v in state.items() if k != "step"}, cfg.keep_checkpoints, rng, scaler)

    def log(record: dict) -> None:
        if main:
            metrics.append(metrics_path, record)

    def next_batch() -> tuple[dict, list[str]]:
        order = batch_order(state["epoch"])
        if state["batch"] >= len(order):
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
            order = batch_order(state["epoch"])
        indices = order[state["batch"]]
        state["batch"] += 1
        rows = [examples[i] for i in indices]
        return collate(rows), [getattr(r, "source", "") or f"example {i}" for r, i in zip(rows, indices)]

    scored = dist.unwrap(model) if dist else model  # evaluators call the model itself (DDP's wrapper cannot generate)

    def evaluate(guard: Guard, rng: dict) -> str | None:
        """An evaluation of the current weights; a signal in it leaves it pending, for the resumed run."""
        state["pending_eval"] = True
        try:
            with guard.abortable():
                stop = _evaluate(scored, evaluator, state, cfg, log)
        except Interrupted:
            model.train()
            save_checkpoint(rng)
            raise
        state["pending_eval"] = False
        return stop

    summary = Summary()
    bar = _progress_bar(total_steps, state["step"], progress and main)
    model.train()
    started, start_tokens, start_seconds = time.perf_counter(), state["tokens"], state["seconds"]
    with Guard(immediate=dist is None) as guard:
        try:
            if evaluator and cfg.eval_at_start and state["step"] == 0 and state["first"] is None:
                try:  # the "before" of before/after, at step 0
                    with guard.abortable():
                        state["first"] = _timed(evaluator, scored)
                except Interrupted:
                    save_checkpoint()  # step 0: the resumed run evaluates first
                    raise
                log({"step": 0, **_numbers(state["first"], "eval_")})
                model.train()
            if state["pending_eval"] and evaluator:  # the one a signal cut short
                evaluate(guard, checkpoint.rng_state())
            while state["step"] < total_steps:
                if dist:  # each rank's dropout draws, a function of the step: a resumed run draws the same
                    torch.manual_seed((cfg.seed * 1_000_003 + state["step"]) * 1009 + dist.rank)
                before = checkpoint.rng_state()  # the step's start: an interrupted step is replayed from here
                position = (state["epoch"], state["batch"], state["tokens"], state["shared_tokens"])
                try:
                    with guard.abortable():
                        step_loss, n_loss, rows, bad = _forward_backward(model, next_batch, cfg, device, autocast,
                                                                         scaler, state, dist)
                except Interrupted:
                    optimizer.zero_grad(set_to_none=True)
                    state["epoch"], state["batch"], state["tokens"], state["shared_tokens"] = position
                    save_checkpoint(before)
                    raise
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = None
                if bad is None and (cfg.max_grad_norm > 0 or scaler is None):
                    norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm or math.inf)
                    grad_norm = dist.value(norm) if dist else norm.item()
                    if scaler is None and not math.isfinite(grad_norm):  # with fp16 the scaler skips such steps
                        bad = ("gradient norm", grad_norm, rows)
                if bad is not None:
                    optimizer.zero_grad(set_to_none=True)
                    if state["skipped"] < cfg.skip_nonfinite_steps:
                        state["skipped"] += 1
                        log({"step": state["step"], "skipped": bad[0], "value": str(bad[1]), "rows": bad[2][:16]})
                        print(f"tuneforge: step {state['step'] + 1}: {bad[0]} {bad[1]}, step skipped "
                              f"({state['skipped']} of {cfg.skip_nonfinite_steps}); rows {', '.join(bad[2][:4])}",
                              file=sys.stderr)
                        continue
                    state["epoch"], state["batch"], state["tokens"], state["shared_tokens"] = position
                    save_checkpoint(before)
                    raise _nonfinite(bad, state["step"], cfg, ckpt_dir)
                try:
                    scaler.step(optimizer) if scaler else optimizer.step()
                except RuntimeError as exc:  # torch's own overflow check on the step size (a huge learning rate)
                    if "overflow" not in str(exc):
                        raise
                    raise RunStopped(f"the optimizer's update overflows at step {state['step'] + 1} ({exc})",
                                     str(ckpt_dir), fix=f"lower train.learning_rate (now {cfg.learning_rate:g}); "
                                                        "the checkpoints written before are kept") from None
                if scaler:
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["step"] += 1
                state["loss_tokens"] += n_loss
                state["seconds"] = start_seconds + time.perf_counter() - started
                state["window_loss"] += step_loss * n_loss
                state["window_tokens"] += n_loss
                summary.final_loss = step_loss
                tok_s = (state["tokens"] - start_tokens) / max(time.perf_counter() - started, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{tok_s:.0f}")

                last = state["step"] == total_steps
                if state["step"] % cfg.logging_steps == 0 or last:
                    loss = state["window_loss"] / max(state["window_tokens"], 1)
                    log({"step": state["step"], "epoch": state["epoch"], "loss": loss, "lr": scheduler.get_last_lr()[0],
                         "grad_norm": grad_norm, "tokens": state["tokens"], "tokens_per_s": tok_s,
                         "seconds": state["seconds"]})
                    state["window_loss"], state["window_tokens"] = 0.0, 0
                stop = None
                over_budget = cfg.time_budget_s is not None and state["seconds"] >= cfg.time_budget_s
                if dist and cfg.time_budget_s is not None:  # every rank stops at the same step
                    over_budget = dist.any(over_budget)
                if evaluator and ((cfg.eval_steps and state["step"] % cfg.eval_steps == 0) or last or over_budget):
                    stop = evaluate(guard, checkpoint.rng_state())
                stop = stop or ("time_budget" if over_budget else None)
                saved = (cfg.save_steps and state["step"] % cfg.save_steps == 0) or last or stop
                if saved:
                    save_checkpoint()
                try:
                    if on_step:
                        on_step(state["step"])
                    if dist:  # a signal to one rank stops them all, at the step they agree on: a signal that
                        # lands after the vote waits for the next one, or one rank would stop alone
                        if dist.any(guard.requested is not None):
                            raise Interrupted(guard.requested or signal.SIGTERM)
                    else:
                        guard.check()
                except KeyboardInterrupt:
                    if not saved:
                        save_checkpoint()
                    raise
                if stop:
                    summary.stopped = stop
                    break
        except KeyboardInterrupt as exc:
            bar.close()
            if main:
                print(f"\ntuneforge: interrupted; checkpoint saved at step {state['step']} (continue with --resume)",
                      file=sys.stderr)
            if isinstance(exc, Interrupted):
                exc.reported = True
            raise
        except BaseException:
            bar.close()
            print(file=sys.stderr)  # the error's line starts on a line of its own, not after the bar
            raise
    bar.close()
    model.eval()
    summary.steps, summary.tokens, summary.loss_tokens = state["step"], state["tokens"], state["loss_tokens"]
    summary.seconds, summary.skipped_steps = state["seconds"], state["skipped"]
    summary.shared_prefix_tokens = state["shared_tokens"]
    summary.tokens_per_s = (state["tokens"] - start_tokens) / max(time.perf_counter() - started, 1e-9)
    summary.peak_memory_mb = dist.max(peak_memory_mb(device)) if dist else peak_memory_mb(device)  # the largest rank
    summary.first_eval, summary.best_eval = state["first"] or {}, state["best"] or {}
    summary.final_eval = state["final"] or {}
    return summary


def _forward_backward(model, next_batch, cfg: TrainCfg, device, autocast, scaler, state: dict, dist: Dist | None):
    """One step's micro-batches, forward and backward: (the step's loss, its loss tokens, the source
    rows of its examples, None or ("loss", value, rows) when a micro-batch's loss is not finite).

    Every rank collates the step's grad_accum x world micro-batches (their loss tokens make the
    divisor) and runs its own; the loss is multiplied by the world size, which the mean over ranks
    of DDP or FSDP2 divides out again. A rank does not stop at a non-finite loss (the others would
    wait for its gradients): the ranks learn of it from the step's sums."""
    world = dist.world if dist else 1
    batches = [next_batch() for _ in range(cfg.grad_accum * world)]
    n_loss = sum(int((b["labels"][:, 1:] != -100).sum()) for b, _ in batches)
    mine = [b for j, b in enumerate(batches) if dist is None or dist.mine(j)]
    # A shared prefix's second forward before one backward is more than FSDP2's resharding allows
    share = not (dist and dist.sharded(model))
    step_loss, tokens, shared, bad = 0.0, 0, 0, None
    for k, (batch, rows) in enumerate(mine):
        batch = {key: v.to(device) for key, v in batch.items()}
        stats = {}
        with dist.no_sync(model, last=k == len(mine) - 1) if dist else contextlib.nullcontext():
            with autocast:
                loss_sum, _ = label_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], stats,
                                         share_prefix=share, position_ids=batch.get("position_ids"))
            loss = loss_sum / max(n_loss, 1)
            value = loss.item()
            if not math.isfinite(value):
                bad = bad or ("loss", value, rows)
                if dist is None:
                    return step_loss, n_loss, rows, bad
            loss = loss * world
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss += value
        tokens += int(batch["attention_mask"].sum())
        shared += stats.get("shared_tokens", 0)
    if dist:
        step_loss, tokens, shared, n_bad = dist.sum(step_loss, tokens, shared, float(bad is not None))
        if n_bad and bad is None:
            bad = ("loss", math.nan, [])
        if n_bad:  # the rows of every rank's non-finite micro-batch
            bad = (bad[0], bad[1], [row for text in dist.gather_text(json.dumps(bad[2])) for row in json.loads(text)])
    state["tokens"] += int(tokens)
    state["shared_tokens"] += int(shared)
    return step_loss, n_loss, [row for _, rows in batches for row in rows], bad


def _nonfinite(bad: tuple, step: int, cfg: TrainCfg, ckpt_dir: Path) -> RunStopped:
    what, value, rows = bad
    shown = ", ".join(rows[:4]) + (f" and {len(rows) - 4} more" if len(rows) > 4 else "")
    return RunStopped(f"the {what} is {value} at step {step + 1} (rows {shown}); training stopped there",
                      str(ckpt_dir), fix=f"lower train.learning_rate (now {cfg.learning_rate:g}), train in fp32 "
                                         f"(train.precision), or let train.skip_nonfinite_steps skip such steps; "
                                         f"the checkpoint of step {step} is kept for --resume")


def _timed(evaluator: Evaluator, model) -> dict:
    started = time.perf_counter()
    return {**evaluator.run(model), "seconds": time.perf_counter() - started}


def _numbers(metrics: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward. Non-reentrant, so a frozen base whose
    inputs need no gradient still passes gradients to the adapters inside it."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _evaluate(model, evaluator: Evaluator, state: dict, cfg: TrainCfg, log) -> str | None:
    result = _timed(evaluator, model)
    model.train()
    log({"step": state["step"], **_numbers(result, "eval_")})
    state["final"] = {"step": state["step"], **result}
    value = result[evaluator.metric]
    best = state["best"]
    if evaluator.better(value, None if best is None else best[evaluator.metric]):
        state["best"], state["bad_evals"] = {"step": state["step"], **result}, 0
    else:
        state["bad_evals"] += 1
    if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
        return "early_stop"
    return None


def _progress_bar(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)
