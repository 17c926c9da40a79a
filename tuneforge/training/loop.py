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

Under torch.distributed (``runtime``, from ``training/runtime.py``) the same loop runs on every rank: each
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from tuneforge.core.config import TrainCfg
from tuneforge.core.errors import RunStopped
from tuneforge.eval.evaluator import Evaluator
from tuneforge.training import checkpoint, metrics, objectives
from tuneforge.training.objectives import Loss
from tuneforge.training.interrupts import Guard, Interrupted
from tuneforge.training.optim import lr_multiplier, make_optimizer
from tuneforge.training.precision import Precision
from tuneforge.training.runtime import Local

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


def shuffled_blocks(n: int, batch_size: int, seed: int) -> BatchOrder:
    """Consecutive blocks of ``batch_size`` examples, each kept whole, in a fresh order each epoch."""
    blocks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]

    def order(epoch: int) -> list[list[int]]:
        perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        return [blocks[i] for i in perm]

    return order


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Progress:
    """Where a run is: what a checkpoint records and a resumed run starts from."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # the next micro-batch of the epoch
    tokens: int = 0
    loss_tokens: int = 0
    best: dict | None = None  # the best evaluation so far
    bad_evals: int = 0  # evaluations since the best (early stopping)
    seconds: float = 0.0
    first: dict | None = None  # the evaluation before the first step
    final: dict | None = None  # the latest evaluation
    pending_eval: bool = False  # an evaluation a signal cut short: the resumed run runs it first
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    window_loss: float = 0.0  # the loss since the last logged step, summed over its units (tokens, pairs)
    window_tokens: int = 0  # those units
    window_metrics: dict = field(default_factory=dict)  # the objective's figures since then, summed over them
    shared_tokens: int = 0
    world: int = 1
    global_batch: int = 0

    @classmethod
    def restored(cls, saved: dict, **now) -> Progress:
        """A checkpoint's progress (keys it lacks take their defaults), with ``now``'s values."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in saved.items() if k in names}, **now})

    def record(self) -> dict:
        """What a checkpoint writes beside its step."""
        return {k: v for k, v in asdict(self).items() if k != "step"}

    def position(self) -> tuple[int, int, int, int]:
        """Where the data stands: what a step that is thrown away puts back."""
        return self.epoch, self.batch, self.tokens, self.shared_tokens

    def rewind(self, position: tuple[int, int, int, int]) -> None:
        self.epoch, self.batch, self.tokens, self.shared_tokens = position


def train(model: nn.Module, params: dict[str, nn.Parameter], examples: Sequence, collate, cfg: TrainCfg,
          out_dir: str | Path, *, batch_order: BatchOrder | None = None, evaluator: Evaluator | None = None,
          resume: bool = False, on_step: Callable[[int], None] | None = None, progress: bool = True,
          runtime: Local | None = None, loss: Loss | None = None) -> Summary:
    """Train ``params`` of ``model`` on ``examples`` (each with ``input_ids``, ``labels`` and, for
    messages, ``source``: the file and line it came from).

    Writes ``metrics.jsonl`` and ``checkpoints/`` under ``out_dir``. With ``resume`` it continues
    from the latest complete checkpoint and reaches the same weights as an uninterrupted run.
    ``on_step(step)`` is called after each optimizer step and any checkpoint it wrote; a
    KeyboardInterrupt it raises stops the run as Ctrl-C does.

    ``loss`` is the objective (``training/objectives``; default: supervised fine-tuning).
    ``runtime`` (``training/runtime.py``; default: one process on the parameters' device) says where
    the processes are. Under several, ``model`` is what ``runtime.wrap`` returned and ``params`` that
    model's trainable parameters (shards, when it is sharded); every process calls ``train`` alike.
    """
    runtime = runtime or Local(next(iter(params.values())).device)
    torch.manual_seed(cfg.seed)
    run = _Run(model, params, examples, collate, cfg, Path(out_dir), batch_order, evaluator, runtime,
               loss or objectives.make(cfg))
    run.start(resume)
    state, scheduler = run.progress, run.scheduler
    summary = Summary()
    bar = _progress_bar(run.total_steps, state.step, progress and runtime.main)
    model.train()
    started, start_tokens, start_seconds = time.perf_counter(), state.tokens, state.seconds
    with Guard(immediate=runtime.immediate_signals) as guard:
        try:
            if evaluator and cfg.eval_at_start and state.step == 0 and state.first is None:
                # the "before" of before/after, at step 0
                with run.stop_point(guard), guard.abortable(), runtime.communicating(run.scored):
                    state.first = _timed(evaluator, run.scored)
                run.log({"step": 0, **_numbers(state.first, "eval_")})
                model.train()
            if state.pending_eval and evaluator:  # the one a signal cut short
                run.evaluate(guard)
            while state.step < run.total_steps:
                runtime.reseed(cfg.seed, state.step)
                with run.stop_point(guard):
                    with guard.abortable():
                        step_loss, n_loss, n_tokens, rows, bad, figures = run.forward_backward()
                    grad_norm, bad = run.unscaled_norm(rows, bad)
                    if bad is not None and state.skipped < cfg.skip_nonfinite_steps:
                        run.skip(bad)
                        continue
                    if bad is not None:
                        raise _nonfinite(bad, state.step, cfg, run.ckpt_dir)
                run.optimizer_step()
                state.step += 1
                state.loss_tokens += n_tokens
                state.seconds = start_seconds + time.perf_counter() - started
                state.window_loss += step_loss * n_loss
                state.window_tokens += n_loss
                for key, value in figures.items():
                    state.window_metrics[key] = state.window_metrics.get(key, 0.0) + value
                summary.final_loss = step_loss
                tok_s = (state.tokens - start_tokens) / max(time.perf_counter() - started, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{tok_s:.0f}")

                last = state.step == run.total_steps
                if state.step % cfg.logging_steps == 0 or last:
                    units = max(state.window_tokens, 1)
                    run.log({"step": state.step, "epoch": state.epoch, "loss": state.window_loss / units,
                             **{k: v / units for k, v in state.window_metrics.items()},
                             "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": state.tokens,
                             "tokens_per_s": tok_s, "seconds": state.seconds})
                    state.window_loss, state.window_tokens, state.window_metrics = 0.0, 0, {}
                # every process stops at the same step
                over_budget = cfg.time_budget_s is not None and runtime.any(state.seconds >= cfg.time_budget_s)
                stop = None
                if evaluator and ((cfg.eval_steps and state.step % cfg.eval_steps == 0) or last or over_budget):
                    stop = run.evaluate(guard)
                stop = stop or ("time_budget" if over_budget else None)
                saved = (cfg.save_steps and state.step % cfg.save_steps == 0) or last or stop
                if saved:
                    run.save()
                try:
                    if on_step:
                        on_step(state.step)
                    # a signal to one process stops them all, at the step they agree on: a signal that
                    # lands after the vote waits for the next one, or one process would stop alone
                    if runtime.any(guard.requested is not None):
                        raise Interrupted(guard.requested or signal.SIGTERM)
                except KeyboardInterrupt:
                    if not saved:
                        run.save()
                    raise
                if stop:
                    summary.stopped = stop
                    break
        except KeyboardInterrupt as exc:
            bar.close()
            runtime.say(f"\ntuneforge: interrupted; checkpoint saved at step {state.step} (continue with --resume)")
            if isinstance(exc, Interrupted):
                exc.reported = True
            raise
        except BaseException:
            bar.close()
            print(file=sys.stderr)  # the error's line starts on a line of its own, not after the bar
            raise
    bar.close()
    model.eval()
    summary.steps, summary.tokens, summary.loss_tokens = state.step, state.tokens, state.loss_tokens
    summary.seconds, summary.skipped_steps, summary.shared_prefix_tokens = state.seconds, state.skipped, \
        state.shared_tokens
    # this session's rate; a resumed run that had no step left reports the run's own, not 0
    trained = state.tokens - start_tokens
    summary.tokens_per_s = (trained / max(time.perf_counter() - started, 1e-9) if trained
                            else state.tokens / max(state.seconds, 1e-9))
    summary.peak_memory_mb = runtime.max(peak_memory_mb(runtime.device))  # the largest process's
    summary.first_eval, summary.best_eval, summary.final_eval = state.first or {}, state.best or {}, state.final or {}
    return summary


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's learning rates to the schedule's at the step it stands at. A resumed run's optimizer
    comes back with the rate its last step set, which is the old schedule's where ``max_steps`` or ``epochs``
    changed (a finished run extended: 0), and LambdaLR does not recompute it on loading; the first step would
    run at it. Where nothing changed the rate is the same number."""
    for group, base, multiplier in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * multiplier(scheduler.last_epoch)


class _Run:
    """What one call of ``train`` holds: the model, its optimizer, schedule and precision, its data
    order, where it stands (``progress``) and where it writes."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], examples: Sequence, collate,
                 cfg: TrainCfg, out_dir: Path, batch_order: BatchOrder | None, evaluator: Evaluator | None,
                 runtime: Local, loss: Loss):
        self.model, self.params, self.examples, self.collate, self.cfg = model, params, examples, collate, cfg
        self.loss = loss
        self.out_dir, self.ckpt_dir, self.metrics_path = out_dir, out_dir / "checkpoints", out_dir / "metrics.jsonl"
        self.evaluator, self.runtime = evaluator, runtime
        self.scored = runtime.unwrap(model)  # evaluators call the model itself (DDP's wrapper cannot generate)
        self.batch_order = batch_order or shuffled_batches(len(examples), cfg.batch_size, cfg.seed)
        self.total_steps = cfg.steps(len(self.batch_order(0)), runtime.world)
        self.optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, self.total_steps, cfg.warmup_steps, cfg.lr_schedule))
        self.precision = Precision(cfg.precision, runtime.device)
        self.progress = Progress(world=runtime.world, global_batch=cfg.batch_size * cfg.grad_accum * runtime.world)
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.scored)  # DDP's wrapper has no such method

    def start(self, resume: bool) -> None:
        """Continue from the latest complete checkpoint (with ``resume``), or start metrics.jsonl afresh."""
        main = self.runtime.main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and (done := checkpoint.complete(self.ckpt_dir))):
            if main:
                self.metrics_path.unlink(missing_ok=True)
            return
        saved = checkpoint.read(done[-1], self.params, {k: p.shape for k, p in self.params.items()})
        restored = self.runtime.restore(self.model, saved, self.params, self.optimizer, self.scheduler,
                                        self.precision.scaler)
        self.progress = Progress.restored(restored, world=self.progress.world, global_batch=self.progress.global_batch)
        follow_schedule(self.scheduler)
        if main and (dropped := metrics.truncate_after(self.metrics_path, self.progress.step)):
            print(f"tuneforge: metrics.jsonl: dropped {dropped} torn or malformed line(s)", file=sys.stderr)
        self.runtime.say(f"tuneforge: resuming from {done[-1].name}")

    def save(self, rng: dict | None = None) -> None:
        """A checkpoint of now (``rng``: the generators' state to record instead of theirs now)."""
        runtime, step = self.runtime, self.progress.step
        if not runtime.all(all(torch.isfinite(runtime.local(p)).all() for p in self.params.values())):
            raise RunStopped(f"the weights are not finite after step {step}, so no checkpoint is written",
                             str(self.ckpt_dir), fix=_restart(self.cfg, self.ckpt_dir))
        tensors, named = runtime.checkpoint_state(self.model, self.params, self.optimizer)  # a collective
        if runtime.main:
            checkpoint.save(self.ckpt_dir, step, tensors, named, self.scheduler, self.progress.record(),
                            self.cfg.keep_checkpoints, rng, self.precision.scaler)

    @contextlib.contextmanager
    def stop_point(self, guard: Guard) -> Iterator[None]:
        """Work that a signal or a non-finite loss may stop: then it is discarded (its gradients, the data
        it took, its random draws), the checkpoint records the state before it, and the stop goes on."""
        position, before = self.progress.position(), checkpoint.rng_state()
        try:
            yield
        except (Interrupted, RunStopped):
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train()
            self.progress.rewind(position)
            self.save(before)
            raise

    def log(self, record: dict) -> None:
        if self.runtime.main:
            metrics.append(self.metrics_path, record)

    def next_batch(self) -> tuple[dict, list[str]]:
        state = self.progress
        order = self.batch_order(state.epoch)
        if state.batch >= len(order):
            state.epoch, state.batch = state.epoch + 1, 0
            order = self.batch_order(state.epoch)
        indices = order[state.batch]
        state.batch += 1
        rows = [self.examples[i] for i in indices]
        return self.collate(rows), [getattr(r, "source", "") or f"example {i}" for r, i in zip(rows, indices)]

    def evaluate(self, guard: Guard) -> str | None:
        """An evaluation of the current weights; a signal in it leaves it pending, for the resumed run."""
        self.progress.pending_eval = True
        with self.stop_point(guard), guard.abortable(), self.runtime.communicating(self.scored):
            stop = _evaluate(self.scored, self.evaluator, self.progress, self.cfg, self.log)
        self.progress.pending_eval = False
        return stop

    def forward_backward(self) -> tuple[float, int, int, list[str], tuple | None, dict]:
        """One step's micro-batches, forward and backward: (the step's loss, its units (tokens that carry
        loss, or pairs), the tokens that carry loss, the source rows of its examples, None or ("loss", value,
        rows) when a micro-batch's loss is not finite, the objective's figures summed over the units).

        Every process collates the step's grad_accum x world micro-batches (their units make the
        divisor) and runs its own; the loss is multiplied by the world size, which the mean over
        processes of DDP or FSDP2 divides out again. Only a process alone stops at a non-finite loss
        (others would wait for its gradients): they learn of it from the step's sums."""
        runtime, model = self.runtime, self.model
        batches = [self.next_batch() for _ in range(self.cfg.grad_accum * runtime.world)]
        n_loss = sum(self.loss.units(b) for b, _ in batches)
        n_tokens = sum(self.loss.loss_tokens(b) for b, _ in batches)
        mine = [b for j, b in enumerate(batches) if runtime.mine(j)]
        # A shared prefix's second forward before one backward is more than FSDP2's resharding allows
        share = not runtime.sharded(model)
        step_loss, tokens, shared, bad, figures = 0.0, 0, 0, None, {}
        for k, (batch, rows) in enumerate(mine):
            batch = {key: v.to(runtime.device) for key, v in batch.items()}
            stats = {}
            with runtime.no_sync(model, last=k == len(mine) - 1):
                with self.precision.autocast():
                    loss_sum, sums = self.loss.loss(model, batch, share, stats)
                loss = loss_sum / max(n_loss, 1)
                value = loss.item()
                if not math.isfinite(value):
                    bad = bad or ("loss", value, rows)
                    if runtime.stops_alone:
                        return step_loss, n_loss, n_tokens, rows, bad, {}
                self.precision.scaler.scale(loss * runtime.world).backward()
            step_loss += value
            tokens += int(batch["attention_mask"].sum())
            shared += stats.get("shared_tokens", 0)
            for key, v in sums.items():
                figures[key] = figures.get(key, 0.0) + v
        names = sorted(figures)  # the same objective on every process: the same names
        step_loss, tokens, shared, n_bad, *sums = runtime.sum(step_loss, tokens, shared, float(bad is not None),
                                                               *(figures[k] for k in names))
        figures = dict(zip(names, sums))
        if n_bad:  # the rows of every process's non-finite micro-batch
            rows = [row for text in runtime.gather_text(json.dumps(bad[2] if bad else [])) for row in json.loads(text)]
            bad = (bad[0], bad[1], rows) if bad else ("loss", math.nan, rows)
        self.progress.tokens += int(tokens)
        self.progress.shared_tokens += int(shared)
        return step_loss, n_loss, n_tokens, [row for _, rows in batches for row in rows], bad, figures

    def unscaled_norm(self, rows: list[str], bad: tuple | None) -> tuple[float | None, tuple | None]:
        """(the gradients' norm, clipped to ``max_grad_norm``; the step's trouble, a non-finite norm
        included). fp16's scaler skips such steps itself, so there the norm is taken only to clip."""
        self.precision.scaler.unscale_(self.optimizer)
        if bad is not None or not (self.cfg.max_grad_norm > 0 or not self.precision.skips_nonfinite):
            return None, bad
        norm = self.runtime.value(torch.nn.utils.clip_grad_norm_(self.params.values(),
                                                                 self.cfg.max_grad_norm or math.inf))
        if not self.precision.skips_nonfinite and not math.isfinite(norm):
            bad = ("gradient norm", norm, rows)
        return norm, bad

    def skip(self, bad: tuple) -> None:
        """Throw the step away (``train.skip_nonfinite_steps`` allows so many), saying so."""
        state = self.progress
        self.optimizer.zero_grad(set_to_none=True)
        state.skipped += 1
        self.log({"step": state.step, "skipped": bad[0], "value": str(bad[1]), "rows": bad[2][:16]})
        print(f"tuneforge: step {state.step + 1}: {bad[0]} {bad[1]}, step skipped ({state.skipped} of "
              f"{self.cfg.skip_nonfinite_steps}); rows {', '.join(bad[2][:4])}", file=sys.stderr)

    def optimizer_step(self) -> None:
        try:
            self.precision.scaler.step(self.optimizer)
        except RuntimeError as exc:  # torch's overflow check on the step size (a huge learning rate) where the
            # update is not fused; the fused kernel writes non-finite weights instead, which the next loss reports
            if "overflow" not in str(exc):
                raise
            raise RunStopped(f"the optimizer's update overflows at step {self.progress.step + 1} ({exc})",
                             str(self.ckpt_dir), fix=_restart(self.cfg, self.ckpt_dir)) from None
        self.precision.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


def _nonfinite(bad: tuple, step: int, cfg: TrainCfg, ckpt_dir: Path) -> RunStopped:
    what, value, rows = bad
    shown = ", ".join(rows[:4]) + (f" and {len(rows) - 4} more" if len(rows) > 4 else "")
    return RunStopped(f"the {what} is {value} at step {step + 1} (rows {shown}); training stopped there",
                      str(ckpt_dir), fix=f"lower train.learning_rate (now {cfg.learning_rate:g}) or train in fp32 "
                                         f"(train.precision) in a new run, or --resume from the checkpoint of step "
                                         f"{step}, written now, with train.skip_nonfinite_steps set to skip such steps")


def _restart(cfg: TrainCfg, ckpt_dir: Path) -> str:
    """The advice when the weights themselves went wrong: resuming would take the same step again (and
    refuses a new learning rate), so a new run; the checkpoint named only if one was written."""
    done = checkpoint.complete(ckpt_dir)
    kept = f"the checkpoints before it are kept (the latest: {done[-1].name})" if done else \
        "no checkpoint had been written"
    return (f"lower train.learning_rate (now {cfg.learning_rate:g}) and start a new run (--overwrite moves this one "
            f"aside); {kept}")


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


def _evaluate(model, evaluator: Evaluator, state: Progress, cfg: TrainCfg, log) -> str | None:
    result = _timed(evaluator, model)
    model.train()
    log({"step": state.step, **_numbers(result, "eval_")})
    state.final = {"step": state.step, **result}
    value = result[evaluator.metric]
    best = state.best
    if evaluator.better(value, None if best is None else best[evaluator.metric]):
        state.best, state.bad_evals = {"step": state.step, **result}, 0
    else:
        state.bad_evals += 1
    if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
        return "early_stop"
    return None


def _progress_bar(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)
