"""A whole run, from a RunCfg to OUTPUT_DIR/final, by one driver for every method.

It checks every path the run needs before any model is converted or loaded, claims the output folder,
reads the data, writes OUTPUT_DIR/config.yaml and prints the estimate, then
- a gradient method: injects it, trains with the loop, saves the adapter (or, for full fine-tuning,
  the whole model), and plots the loss curve;
- a probe method (features): extracts the frozen model's features, fits the classifier, saves it;
and writes summary.json with the same keys for both ("after": the held-out figures of the result).

Under torchrun (WORLD_SIZE > 1) every process runs this driver: rank 0 claims the output folder and
writes everything in it; each process trains its share on its device (``training/runtime.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from tuneforge.core import config as config_mod
from tuneforge.core.atomic import atomic_path, write_text
from tuneforge.core.config import RunCfg
from tuneforge.data import Collator, Datasets, Example, length_grouped_batches, load_datasets
from tuneforge.data.collate import PackingCollator, packed_batches, padded_positions
from tuneforge.data.readers import file_kind, sources
from tuneforge.core.errors import UserError
from tuneforge.model.devices import available_memory, resolve_device
from tuneforge.training.estimate import Estimate, Shape, batch_shapes, estimate
from tuneforge.eval.evaluator import make_evaluator
from tuneforge.methods import feature_cache
from tuneforge.io.export import save_model
from tuneforge.model.fingerprint import fingerprint
from tuneforge.io.load import load_model, load_tokenizer, resolve_spec
from tuneforge.io.peft_format import load_adapter, read_config, save_adapter, save_probe
from tuneforge.model.families import family_of
from tuneforge.methods._shared import GradientMethod, Injected, ProbeMethod, parameter_count
from tuneforge.methods.registry import get_method
from tuneforge.data.preference import RowsCollator
from tuneforge.training import checkpoint, objectives, output
from tuneforge.training.objectives import reference
from tuneforge.training.loop import shuffled_batches, shuffled_blocks, train
from tuneforge.training.prepare import prepare
from tuneforge.training.precision import hold_frozen_linears, holds_frozen_linears
from tuneforge.training.runtime import Local


@dataclass
class RunContext:
    """One run, built once: its config and method, where its processes are, its output folder, and
    how it was started. The model and tokenizer are the caller's, or None until loaded."""

    cfg: RunCfg
    method: GradientMethod | ProbeMethod
    runtime: Local
    out: Path
    resume: bool
    progress: bool
    force: bool
    model: nn.Module | None = None
    tokenizer: object = None
    injected: Injected | None = None
    loaded: bool = False  # the run loaded the model itself (not the caller's): its layers may change dtype

    def say(self, line: str) -> None:
        self.runtime.say(f"tuneforge: {line}")


def run(cfg: RunCfg, resume: bool = False, progress: bool = True, *, model=None, tokenizer=None,
        injected: Injected | None = None, overwrite: bool = False, force: bool = False) -> dict:
    """Train as ``cfg`` says; returns the summary also written to OUTPUT_DIR/summary.json.

    ``model`` and ``tokenizer``, when given, are used instead of loading ``cfg.model`` (which should
    still name that model: config.yaml records it); ``injected`` (what ``inject`` returned for that
    model) is a method you injected yourself, and then replaces ``cfg.method``. A run whose estimated
    peak memory exceeds what the device has is refused before the model loads, unless ``force``."""
    if injected is not None:
        if model is None:
            raise UserError("injected= needs the model it was injected into", fix="pass model= and tokenizer= too")
        cfg = config_mod.with_method(cfg, injected.name, injected.cfg)
    if (model is None) != (tokenizer is None):
        raise UserError("model= and tokenizer= go together", fix="pass both, or neither to load cfg.model")
    method = get_method(cfg.method.name)
    path = PATHS[method.KIND]  # the one place a run asks: gradient or probe
    written_as, cfg = cfg.train.output_dir, _home_expanded(cfg)
    check_inputs(cfg)
    path.check(cfg, method, model, resume)
    runtime = runtime_from_env(cfg.train.device, cfg.train.dist_timeout_s)
    try:
        out = Path(cfg.train.output_dir)
        if cfg.train.output_dir != written_as:
            runtime.say(f"tuneforge: train.output_dir {written_as} is {out}")
        lock = runtime.first(lambda: _claim(cfg, out, resume, overwrite, runtime.world))  # rank 0 claims it
        try:
            return _run(path, RunContext(cfg, method, runtime, out, resume, progress, force, model, tokenizer,
                                         injected))
        finally:
            if lock is not None:
                lock.release()
    finally:
        runtime.close()


def _home_expanded(cfg: RunCfg) -> RunCfg:
    """``cfg`` with a ``~`` in train.output_dir made the home folder, as a shell does (not a folder named ~)."""
    try:
        out = str(Path(cfg.train.output_dir).expanduser()) if cfg.train.output_dir.startswith("~") else None
    except RuntimeError:  # ~name of a user this machine does not have
        raise UserError("no such user's home folder", f"train.output_dir ({cfg.train.output_dir})",
                        fix="give the folder's path in full") from None
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=out)) if out else cfg


def check_inputs(cfg: RunCfg) -> None:
    """Every path a run reads, and its output folder, checked before any model is converted or loaded and
    without creating anything: a wrong path is one line at once, not after minutes of work."""
    if not cfg.data.path:
        raise UserError("no training data file", "data.path",
                        fix="set data.path to a data file, a `datasets` folder, or a list of them (docs/formats.md)")
    for source in sources(cfg.data):
        file_kind(source.cfg.path)
    if cfg.data.eval_path:
        file_kind(cfg.data.eval_path)
    if cfg.train.start_from:
        read_config(Path(cfg.train.start_from))
    output.check_folder(Path(cfg.train.output_dir))


def runtime_from_env(device: str, timeout_s: float) -> Local:
    """The runtime this process was started in: torchrun's process group (WORLD_SIZE > 1), or one
    process on ``device``; never None. A collective that waits longer than ``timeout_s`` ends the run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Local(resolve_device(device))
    from tuneforge.training import dist  # torch.distributed's modules load only for several processes

    return dist.from_env(device, timeout_s)


def _claim(cfg: RunCfg, out: Path, resume: bool, overwrite: bool, world: int) -> output.Claim:
    lock = output.claim(out, resume, overwrite)
    try:
        record = output.record(cfg)
        if resume:
            if not checkpoint.complete(out / "checkpoints"):
                raise UserError("there is no checkpoint to resume from", str(out / "checkpoints"),
                                fix="start the run again without --resume (with --overwrite to move this one aside)")
            output.check_resume(cfg, out, world, record)
        if not (resume and (out / output.MANIFEST).is_file()):  # a resumed run keeps its checkpoints' record
            output.begin(out, record)
    except BaseException:
        lock.release()
        raise
    return lock


def _run(path, ctx: RunContext) -> dict:
    cfg, runtime = ctx.cfg, ctx.runtime
    ctx.tokenizer = ctx.tokenizer or load_tokenizer(cfg.model)
    data = objectives.data(cfg.train, load_datasets(cfg.data, ctx.tokenizer, seed=cfg.train.seed))
    if runtime.main:
        write_text(ctx.out / "config.yaml", config_mod.to_yaml(cfg))
        for split, report in data.report.items():
            if report.truncated or report.dropped:
                ctx.say(f"{split}: of {report.rows} rows read, {report.truncated} truncated to {cfg.data.max_length} "
                        f"tokens, {report.dropped_line()}; {report.examples} examples kept")
            if report.sources:  # a mixture: each source's examples in this split
                ctx.say(f"{split}: {report.line()}")
    path.before_loading(ctx, data)
    if ctx.model is None:
        ctx.model, _ = load_model(cfg.model, dtype="float32", device=str(runtime.device),
                                  allow_pickle=cfg.allow_pickle)
        ctx.loaded = True
    result = path.result(ctx, data)
    if runtime.main:
        result["artifact_bytes"] = sum(f.stat().st_size for f in (ctx.out / "final").rglob("*") if f.is_file())
        result["data"] = {split: dataclasses.asdict(report) for split, report in data.report.items()}
        write_text(ctx.out / "summary.json", json.dumps(result, indent=1))
    return result


class Gradient:
    """A gradient method's run: the cost first, then prepare, train, save."""

    @staticmethod
    def check(cfg: RunCfg, method, model, resume: bool) -> None:
        family = family_of(model.config if model is not None else AutoConfig.from_pretrained(resolve_spec(cfg.model)))
        if family.encoder:
            raise UserError(f"{family.name} is an encoder: its attention reads the whole text at once, so it cannot "
                            "learn to predict the next token", "method.name",
                            fix="use method.name: features (a classifier on its hidden states), or a causal LM")

    @staticmethod
    def before_loading(ctx: RunContext, data: Datasets) -> None:
        """The estimate, printed before the model loads; a run it says will not fit is refused."""
        if ctx.force:
            ctx.say("the estimate is skipped (--force)")
            return
        runtime = ctx.runtime

        def check() -> None:
            if est := _estimate_or_none(ctx.cfg, data, ctx.tokenizer, ctx.model, runtime.world):
                check_fits(est, ctx.force, runtime.local_world if runtime.device.type == "cpu" else 1)

        runtime.first(check)

    @staticmethod
    def result(ctx: RunContext, data: Datasets) -> dict:
        return _train(ctx, data)


class Probe:
    """A probe method's run: extract the frozen model's features, fit, save; no steps, no estimate."""

    @staticmethod
    def check(cfg: RunCfg, method, model, resume: bool) -> None:
        if cfg.data.format != "classification":
            raise UserError(f"the {method.NAME} method fits a classifier and needs classification data, not "
                            f"{cfg.data.format!r}", "data.format",
                            fix="set data.format: classification (with text_column and label_column)")
        if resume:
            raise UserError(f"the {method.NAME} method fits in one go and keeps no checkpoints to resume from",
                            "--resume", fix="run it again (its features are cached) in a new train.output_dir")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(f"the {method.NAME} method fits a classifier in one process", "torchrun",
                            fix="run it as a single process: tuneforge train, without torchrun or --nproc")

    @staticmethod
    def before_loading(ctx: RunContext, data: Datasets) -> None:
        pass

    @staticmethod
    def result(ctx: RunContext, data: Datasets) -> dict:
        return _fit_probe(ctx, data)


PATHS = {"gradient": Gradient, "probe": Probe}


def _train(ctx: RunContext, data: Datasets) -> dict:
    cfg, runtime, model, tokenizer = ctx.cfg, ctx.runtime, ctx.model, ctx.tokenizer
    torch.manual_seed(cfg.train.seed)
    if cfg.train.start_from:
        start = load_adapter(model, cfg.train.start_from)
        if not isinstance(start, Injected):
            raise UserError("a feature classifier is no starting point for a model", "train.start_from",
                            fix="give the folder of a gradient method's adapter (LoRA, say)")
        start.merge(model)  # its update is the base's now: where training, and any reference, start
        ctx.say(f"started from {cfg.train.start_from} ({start.name}, merged into the base)")
    injected, params = prepare(model, ctx.method, cfg, ctx.injected)
    total, n_train = parameter_count(model), sum(p.numel() for p in params.values())
    ctx.say(f"{injected.name}: {n_train:,} trainable parameters of {total:,} ({100 * n_train / total:.3f}%); "
            f"{len(data.train)} training examples, {len(data.eval)} held out")
    shard = runtime.world > 1 and (injected.method.WHOLE_MODEL or cfg.train.fsdp)
    if shard and cfg.train.precision == "fp16":  # fp16's loss scaler would check each shard on its own
        raise UserError("fp16 with FSDP2 sharding is not supported", "train.precision",
                        fix="set train.precision to bf16 (or auto, bf16 on CUDA) for a sharded run")
    loss, data = _objective(ctx, injected, data)
    wrapped = runtime.wrap(model, shard)
    params = injected.trainable(model)  # sharding replaces the parameters with their shards
    if line := runtime.describe(shard, cfg.train.batch_size, cfg.train.grad_accum):
        ctx.say(line)
    packing = None
    if cfg.data.packing:
        check_packing(model, injected.name)
        packing = packing_report(cfg, data)
        ctx.say(packing_line(cfg, packing))
    # after the last forward outside autocast (the packing check); a whole model is saved as it is held
    if (ctx.loaded and holds_frozen_linears(injected.method, runtime.world, cfg.train.fsdp)
            and (freed := hold_frozen_linears(model, cfg.train.precision, runtime.device))):
        ctx.say(f"frozen linear layers held in train.precision's dtype, as autocast computes them: "
                f"{freed / 2**20:,.0f} MB freed")
    collate = collator(cfg, tokenizer)
    if loss.paired and data.eval:
        evaluator = objectives.evaluator(loss, data.eval, collate, cfg.eval.batch_size, cfg.train.precision)
    else:
        evaluator = make_evaluator(tokenizer, data, cfg)
    summary = train(wrapped, params, data.train, collate, cfg.train, ctx.out, batch_order=batch_order(cfg, data),
                    evaluator=evaluator, resume=ctx.resume, progress=ctx.progress, runtime=runtime, loss=loss)
    _save_final(ctx, injected)
    result = {"method": injected.name, "trainable_parameters": n_train, "total_parameters": total,
              "train_examples": len(data.train), "eval_examples": len(data.eval),
              # "after" is the weights the run saved; "best" an earlier evaluation that scored higher, if any
              "before": _numbers(summary.first_eval) or None,
              "after": _numbers(summary.final_eval or summary.best_eval),  # best: a resumed run with no steps left
              **summary.as_dict()}
    if summary.final_eval and summary.best_eval.get("step") != summary.final_eval.get("step"):
        result["best"] = _numbers(summary.best_eval)
    if packing:
        result["packing"] = packing
    for key in ("best_eval", "first_eval", "final_eval"):
        result.pop(key)
    if runtime.main:
        plot_losses(ctx.out / "metrics.jsonl", ctx.out / "loss.png")
    return result


def _objective(ctx: RunContext, injected: Injected, data: Datasets) -> tuple[objectives.Loss, Datasets]:
    """The run's loss, with its reference: the model with the method off, or (full fine-tuning) the
    log-probabilities of the model as it starts, computed ahead for every example (rank 0 computes
    and caches them; the others read the cache)."""
    cfg = ctx.cfg
    if not objectives.module(cfg.train.objective).REFERENCE:
        return objectives.make(cfg.train), data
    if not injected.method.WHOLE_MODEL:
        return objectives.make(cfg.train, reference.switched_off(ctx.model, injected)), data
    collate, size = collator(cfg, ctx.tokenizer), cfg.eval.batch_size
    both = ctx.runtime.first(lambda: reference.ahead(ctx.model, data.train + data.eval, collate, size))
    if both is None:  # the other processes read what rank 0 computed and cached
        both = reference.ahead(ctx.model, data.train + data.eval, collate, size)
    data = dataclasses.replace(data, train=both[:len(data.train)], eval=both[len(data.train):])
    return objectives.make(cfg.train, reference.from_batch), data


def _save_final(ctx: RunContext, injected: Injected) -> None:
    """OUTPUT_DIR/final: the adapter, or the whole model; from a sharded model, gathered whole first
    (collectives: every process takes part, rank 0 writes)."""
    model, runtime = ctx.model, ctx.runtime
    if injected.method.WHOLE_MODEL:
        state = runtime.full_model(model)  # a sharded model's, on rank 0's CPU; else the model's own
        if runtime.main:
            save_model(model, ctx.tokenizer, ctx.out / "final", state_dict=state)
        return
    tensors = runtime.whole(injected.state_dict(model))
    if runtime.main:
        save_adapter(model, injected, ctx.out / "final", base_model_name=ctx.cfg.model, tensors=tensors)


def _fit_probe(ctx: RunContext, data: Datasets) -> dict:
    """Extract, fit, score and save a probe; its timings and layer choice go in the summary's "fit"."""
    cfg, method, model, tokenizer = ctx.cfg, ctx.method, ctx.model, ctx.tokenizer
    method_cfg = config_mod.method_config(cfg)
    if ctx.progress:
        ctx.say(f"{method.NAME}: {len(data.train_items)} training texts, {len(data.eval_items)} held out")
    started = time.perf_counter()
    layers = method.layers(model, method_cfg)
    stack, hit = feature_cache.extract(model, tokenizer, [it.text for it in data.train_items], method_cfg, layers)
    extracted = time.perf_counter()
    probe = method.fit(stack, layers, [it.label for it in data.train_items], method_cfg, data.label_words,
                       base=fingerprint(model))
    fitted = time.perf_counter()
    evaluator = make_evaluator(tokenizer, data, cfg, probe)
    after = {**evaluator.run(model), "seconds": time.perf_counter() - fitted} if evaluator else None
    save_probe(method, probe, ctx.out / "final")
    return {"method": method.NAME, "trainable_parameters": probe.parameter_count(),
            "train_examples": len(data.train_items), "eval_examples": len(data.eval_items), "before": None,
            "after": _numbers(after), "seconds": fitted - started,
            "fit": {**probe.report(), "cache_hit": hit, "seconds_extract": extracted - started,
                    "seconds_fit": fitted - extracted}}


def batch_order(cfg: RunCfg, data: Datasets):
    """epoch -> the lists of example indices the loop takes as micro-batches; with ``data.packing`` each
    list holds the examples of ``train.batch_size`` packed rows, row after row, for ``collator`` to cut."""
    lengths = [len(e.input_ids) for e in data.train] if cfg.data.packing or cfg.data.group_by_length else []
    if cfg.data.packing:  # several examples to a row: next to no padding (cached: the loop asks every batch)
        return functools.lru_cache(maxsize=2)(lambda epoch: packed_batches(
            lengths, cfg.data.max_length, cfg.train.batch_size, cfg.train.seed, epoch))
    if cfg.data.group_by_length:  # batches of similar length waste little on padding
        return lambda epoch: length_grouped_batches(lengths, cfg.train.batch_size, cfg.train.seed, epoch)
    if objectives.module(cfg.train.objective).GROUPED:  # the objective's blocks, in a shuffled order
        return shuffled_blocks(len(data.train), cfg.train.batch_size, cfg.train.seed)
    return shuffled_batches(len(data.train), cfg.train.batch_size, cfg.train.seed)


def collator(cfg: RunCfg, tokenizer):
    """What turns ``batch_order``'s lists of examples into a batch: packed rows, preference pairs'
    rows, or padded examples."""
    if cfg.data.format == "preference":
        return RowsCollator(tokenizer.pad_token_id)
    if cfg.data.packing:
        return PackingCollator(tokenizer.pad_token_id, cfg.data.max_length)
    return Collator(tokenizer.pad_token_id)


def packing_line(cfg: RunCfg, packing: dict) -> str:
    """``packing_report`` in one line, as a run and `tuneforge data` print it."""
    return (f"packing: {packing['examples']} examples in {packing['rows']} rows of at most {cfg.data.max_length} "
            f"tokens, {packing['batches']} batches of {cfg.train.batch_size} rows an epoch (unpacked: "
            f"{packing['batches_unpacked']}); padding {packing['padding_unpacked']:,} -> {packing['padding_packed']:,} "
            "token positions an epoch")


def packing_report(cfg: RunCfg, data: Datasets) -> dict:
    """What packing saves in an epoch (the first): the padding of the batches the run would make unpacked
    (length-grouped with ``data.group_by_length``, else shuffled), against that of its packed rows."""
    lengths = [len(e.input_ids) for e in data.train]
    unpacked = batch_order(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=False)), data)(0)
    packed = batch_order(cfg, data)(0)
    padding_unpacked, _ = padded_positions(lengths, unpacked)
    padding_packed, rows = padded_positions(lengths, packed, cfg.data.max_length)
    return {"examples": len(lengths), "rows": rows, "tokens": sum(lengths), "batches": len(packed),
            "batches_unpacked": len(unpacked), "padding_unpacked": padding_unpacked, "padding_packed": padding_packed}


PROBE_LENGTHS, PROBE_WIDTH = (6, 5, 4, 7), 12  # two rows of two examples


# How far a packed probe may score from the same examples alone: in float32 they agree to 3e-7
# (tests/test_packing.py); 16-bit weights round logits of size 8-16 to 0.03-0.06, so there the bound is
# wider (not measured on a GPU here).
PACKING_TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 0.1, torch.float16: 0.1}


def check_packing(model, method: str, tolerance: float | None = None) -> None:
    """Refuse packing where the examples of a row would see each other: a probe's random examples, packed
    two to a row, must score as they do alone. Where attention is masked to each example this holds to
    rounding; where it is not (a model whose masks ignore restarting positions, a method's virtual tokens
    or prefix, a recurrent layer's state), the second example of a row sees the first, and scores apart."""
    from tuneforge.eval.lm import label_logprobs

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    tolerance = tolerance if tolerance is not None else PACKING_TOLERANCE.get(dtype, 0.1)
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    examples = []
    for n in PROBE_LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        examples.append(Example(ids, ids))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch = {k: v.to(device) for k, v in PackingCollator(0, PROBE_WIDTH)(examples).items()}
            packed, _ = label_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                       position_ids=batch["position_ids"])
            alone = []
            for e in examples:
                ids = torch.tensor([e.input_ids], device=device)  # (1, n)
                alone.append(label_logprobs(model, ids, torch.ones_like(ids), ids)[0])
    finally:
        model.train(was_training)
    gap = (packed.float() - torch.cat(alone).float()).abs().max().item()
    if not gap <= tolerance:
        name = family_of(model).name
        raise UserError(f"packed rows are not exact on this model ({name}, method {method}): examples packed two to "
                        f"a row scored {gap:.3g} away from the same examples alone, so the examples of a row would "
                        "see each other (its attention is not masked by restarting positions, or a method's virtual "
                        "tokens or a recurrent state spans the row)", "data.packing",
                        fix="set data.packing: false (data.group_by_length: true keeps the padding low)")


def run_estimate(cfg: RunCfg, data: Datasets, tokenizer, model_config=None, world: int = 1,
                 holds_frozen: bool = True) -> Estimate:
    """The estimate of this run, from the batches its data will make (the longest for memory), its
    steps shared by ``world`` processes; ``holds_frozen``: the run loads the model itself, and may hold
    its frozen layers in half precision."""
    batches = batch_order(cfg, data)(0)
    if not (cfg.data.packing or cfg.data.format == "preference"):
        shapes = batch_shapes(data.train, batches, tokenizer.pad_token_id)
        return estimate(cfg, shapes, batches_per_epoch=len(batches), model_config=model_config, world=world,
                        holds_frozen=holds_frozen)
    collate, shapes = collator(cfg, tokenizer), []
    for indices in batches:  # packed rows share no prefix
        batch = collate([data.train[i] for i in indices])
        rows, width = batch["input_ids"].shape
        if cfg.data.format == "preference":  # each pair runs at its own width: the batch's mean, prompts unshared
            width = -(-2 * sum(data.train[i].length for i in indices) // rows)
        shapes.append(Shape(rows, width, 0, int((batch["labels"][:, 1:] != -100).sum())))
    return estimate(cfg, shapes, batches_per_epoch=len(batches), model_config=model_config, world=world,
                    holds_frozen=holds_frozen)


def _estimate_or_none(cfg: RunCfg, data: Datasets, tokenizer, model, world: int = 1) -> Estimate | None:
    """The run's estimate, or None (said in one line) where it cannot be made: an estimate never blocks a run."""
    try:
        return run_estimate(cfg, data, tokenizer, model.config if model is not None else None, world,
                            holds_frozen=model is None)
    except UserError:
        raise
    except Exception as exc:  # a model the estimate does not understand: the run itself may still work
        print(f"tuneforge: no estimate for this model ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
              "training goes on", file=sys.stderr)
        return None


def estimate_run(cfg: RunCfg) -> Estimate:
    """`tuneforge estimate`: from the data's batches when ``data.path`` is set (its tokenizer and data are
    read, not the model's weights), else the upper bound of full batches of ``data.max_length``."""
    if get_method(cfg.method.name).KIND == "gradient" and cfg.data.path:
        tokenizer = load_tokenizer(cfg.model)
        return run_estimate(cfg, load_datasets(cfg.data, tokenizer, seed=cfg.train.seed), tokenizer)
    return estimate(cfg)


def check_fits(est: Estimate, force: bool, processes: int = 1) -> None:
    """Print the estimate; refuse a run whose peak exceeds the memory the device has, unless ``force``.
    ``processes`` share the device's memory (torchrun's processes on one CPU machine)."""
    print(f"tuneforge: {est.describe()}" + (f" (per process, {processes} processes)" if processes > 1 else ""),
          file=sys.stderr)
    if (short := shortfall(est, processes)) and not force:
        raise UserError(short[0], "train", fix=f"{short[1]}; or pass --force to try anyway")


def shortfall(est: Estimate, processes: int = 1) -> tuple[str, str] | None:
    """(how far the run's peak exceeds the memory the device has, what lowers its largest part), or None where it
    fits or the device's memory is unknown. ``processes`` share it."""
    available = available_memory(resolve_device(est.device))
    if available is None or est.peak_bytes <= available // processes:
        return None
    largest = max(est.parts, key=est.parts.get) if est.parts else None
    return (f"the run needs about {est.peak_bytes / 2**30:.2f} GiB at its peak, and this machine has "
            f"{available // processes / 2**30:.2f} GiB available"
            + (f"; the largest part is {largest.replace('_', ' ')}, {est.parts[largest] / 2**30:.2f} GiB"
               if largest else ""), LOWER.get(largest, LOWER["activations"]))


# What lowers each part of the estimate's peak (``Estimate.parts``), for the refusal of a run that does not fit
LOWER = {
    "train_state": "train fewer parameters (a smaller method.r, or LoRA or QLoRA rather than full fine-tuning: their "
                   "gradients and optimizer state are the train state)",
    "weights": "load a smaller model, or use method.name: qlora (4-bit weights)",
    "activations": "lower train.batch_size (raise train.grad_accum to keep the step), data.max_length, or set "
                   "train.gradient_checkpointing: true",
}


def _numbers(metrics: dict | None) -> dict | None:
    """The figures of an evaluation for the summary: its numbers and the accuracy's interval."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or k == "accuracy_ci95"}


def plot_losses(metrics_path: Path, png: Path) -> None:
    """Training and validation loss against the step; under a preference objective, a second panel with
    the rewards of the chosen and the rejected answers and the held-out margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]

    rewards = any("rewards_margin" in r for r in records)
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(11 if rewards else 6, 4), squeeze=False)
    panels = [(axes[0][0], [("loss", "train"), ("eval_loss", "validation")], "loss (nats per token, or per pair)")]
    if rewards:
        panels.append((axes[0][1], [("rewards_chosen", "chosen"), ("rewards_rejected", "rejected"),
                                    ("eval_rewards_margin", "validation margin")], "reward"))
    for ax, lines, ylabel in panels:
        for key, label in lines:
            if points := series(key):
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
