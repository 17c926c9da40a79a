"""What a run will cost before it starts: parameters, peak memory, time per step and per run.

The model is built on the meta device from its config (no weights are read), the method is injected
into it, and the parts follow:

- weights: the model's tensors as the method leaves them (4-bit codes for QLoRA);
- train state: a gradient and AdamW's two moments per trainable value (12 bytes in fp32);
- activations: what autograd keeps for backward, counted by running the step's forward on the meta
  device under ``saved_tensors_hooks`` for the longest batch the data will produce (its rows and
  width, and the prefix its rows share), so every method and every saving in ``kernels.py`` is
  counted as the real step keeps it; a probe method keeps nothing;
- the head: the hidden states of the positions that carry loss, and one chunk of logits;
- overhead: the process and its libraries, and what the allocator holds beyond the live tensors,
  both measured on real runs (``bench/estimate.py`` compares prediction and measurement).

Time is the step's work over the device's measured matmul rate, in seven parts (``TIME_COST``): the
floating-point work of the matmuls (the mean batch, the shared prefix counted once), the elementwise
passes over each block's activations (norms, rotary, activation functions, residuals), LoRA's dropout
masks (per value masked, and per mask drawn), the dequantization of 4-bit weights in forward and
backward, the optimizer's update of every trainable value, and each block's fixed cost per pass (the
operations it runs whatever their size: what a short batch pays most for; a shared prefix runs each
block a second time). Each part's cost per unit of work, in flops of matmul time, is fitted
on the measured steps of every method (``python bench/estimate.py --fit``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

from tuneforge.core.config import RunCfg
from tuneforge.model.devices import resolve_device
from tuneforge.io.load import resolve_spec
from tuneforge.data import Collator
from tuneforge.model.families import family_of
from tuneforge.model.kernels import HEAD_CHUNK, shared_prefix
from tuneforge.quant.nf4 import NF4Linear
from tuneforge.methods._shared import parameter_count
from tuneforge.methods.lora import LoRALinear
from tuneforge.methods.registry import get_method
from tuneforge.training import objectives
from tuneforge.training.precision import hold_frozen_linears, holds_frozen_linears
from tuneforge.training.prepare import prepare

# Measured on this project's reference machine (2-core CPU, fp32) with bench/estimate.py: the share
# of the matmul rate a training step reaches, the process's own memory (python, torch, transformers,
# tokenizer and data), and what glibc's allocator keeps beyond the live tensors during a step, as a
# fraction of the saved activations. On CUDA the figures are the caching allocator's.
STEP_EFFICIENCY = {"cpu": 0.55, "cuda": 0.35}  # the matmuls' share of the rate, where TIME_COST has no fit
# Matmul-time cost of one unit of each part of a step's work, fitted by ``bench/estimate.py --fit`` on the
# runs of ``bench/methods.py`` (every method, both workloads) kept from two hosts at once, whose fp32 matmuls ran
# at 170 and 360 GFLOP/s (when both ran one version of the code, costs fitted on one host's runs alone missed the
# other's steps by up to 36%; the slower host's runs kept now are of the code before AdamW's fused update on the
# CPU, docs/estimate.md):
# "matmul" per flop
# (1 / the share of the matmul rate a step's matmuls reach), "elementwise" per activation value of a block
# (hidden plus MLP width, per token position and layer), "dropout" per value masked, "dropout_calls" per mask
# drawn (its fixed cost: the draw's operations, whatever the size), "dequantize" per 4-bit weight rebuilt,
# "optimizer" per trainable value, "blocks" per block a micro-batch passes through (forward, and backward
# again; a shared prefix is a second pass). No fit for CUDA: there, matmul work at STEP_EFFICIENCY.
TIME_COST = {"cpu": {"matmul": 1.366, "elementwise": 0.0, "dropout": 380.7, "dropout_calls": 1.824e8,
                     "dequantize": 615.7, "optimizer": 300.5, "blocks": 8.511e8}}
PROCESS_BYTES = {"cpu": 420 * 2**20, "cuda": 0}
ALLOCATOR_SHARE = {"cpu": 0.85, "cuda": 0.15}


@dataclass(frozen=True)
class Shape:
    """A micro-batch: its rows, its width (the longest row), and the leading tokens all rows share."""

    rows: int
    width: int
    shared: int = 0
    loss_tokens: int = 0  # positions that carry loss


@dataclass(frozen=True)
class Estimate:
    total_params: int
    trainable_params: int
    parts: dict[str, int] = field(default_factory=dict)  # bytes at the peak, by kind
    longest: Shape | None = None
    tokens_per_step: int = 0
    flops_per_step: float = 0.0
    step_seconds: float = 0.0
    work: dict[str, float] = field(default_factory=dict)  # a step's units of each part of TIME_COST, and the rate
    steps: int | None = None
    device: str = "cpu"
    basis: str = "meta forward"  # how activations were counted: "meta forward", or "config shapes" where it cannot run

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def run_seconds(self) -> float | None:
        return self.steps * self.step_seconds if self.steps else None

    def as_dict(self) -> dict:
        return {**asdict(self), "peak_memory_bytes": self.peak_bytes, "run_seconds": self.run_seconds}

    def describe(self) -> str:
        gib = 2**30
        total = f", about {self.run_seconds / 60:.1f} min for {self.steps} steps" if self.steps else ""
        parts = ", ".join(f"{k.replace('_', ' ')} {v / gib:.2f}" for k, v in self.parts.items())
        shape = (f" (the longest batch: {self.longest.rows} x {self.longest.width} tokens"
                 f"{f', {self.longest.shared} shared' if self.longest.shared else ''})") if self.longest else ""
        basis = "" if self.basis == "meta forward" else f" (activations from the {self.basis})"
        return (f"estimate{basis}: {self.trainable_params:,} trainable of {self.total_params:,} parameters "
                f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%); peak memory about "
                f"{self.peak_bytes / gib:.2f} GiB{shape}: {parts}; {self.step_seconds:.1f} s per step of "
                f"{self.tokens_per_step:,} tokens{total}")


def matmul_flops_per_s(device: torch.device, size: int = 1024, repeats: int = 4, rounds: int = 5,
                       dtype: torch.dtype = torch.float32) -> float:
    """The device's matmul rate (fp32 unless ``dtype`` says otherwise): the median of ``rounds`` timings of
    ``repeats`` products (about 0.2 s in all on two CPU cores). One timing alone moves with whatever else the
    machine does in its 40 ms; the median of five is steadier."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    timings = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - start)
    return 2 * size**3 * repeats / statistics.median(timings)


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class _AttentionSaves(torch.autograd.Function):
    """On the meta device, what a fused attention kernel (flash attention on CPU and CUDA) keeps for
    backward: the query, key and value (at their own head counts), the output and a log-sum-exp per
    query. The meta device would otherwise run the unfused math and count the probabilities."""

    @staticmethod
    def forward(ctx, query, key, value):
        out, lse = query.new_empty(query.shape), query.new_empty(query.shape[:3])
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the probe only counts what is kept
        raise NotImplementedError


def _probe_attention(module, query, key, value, attention_mask, **_):
    return _AttentionSaves.apply(query, key, value).transpose(1, 2).contiguous(), None


PROBE_ATTENTION = "tuneforge_estimate_probe"
AttentionInterface.register(PROBE_ATTENTION, _probe_attention)


class _NoHead(nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, :0]


def saved_bytes(model: nn.Module, shape: Shape) -> int:
    """Bytes autograd keeps for backward in one training forward of ``shape`` on ``model`` (on the meta
    device: no weights, no data, only shapes), the head left out. The rows' shared prefix runs once at
    batch 1, as ``eval.lm.token_logprobs`` runs it. No mask is passed: the probe's attention reads none."""
    head = model.get_output_embeddings()
    saved: dict[int, int] = {}
    params = {id(p) for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params:  # a weight's view is the weight, counted already
            saved[id(t)] = t.numel() * t.element_size()
        return t

    def ids(rows: int, width: int) -> torch.Tensor:
        return torch.zeros(rows, width, dtype=torch.long, device="meta")

    model.set_output_embeddings(_NoHead())
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            width, kwargs = shape.width, {}
            if shape.shared:
                out = model(input_ids=ids(1, shape.shared), use_cache=True)
                cache = next(getattr(out, k) for k in ("cache", "past_key_values") if getattr(out, k, None) is not None)
                cache.batch_repeat_interleave(shape.rows)
                kwargs = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
                width = shape.width - shape.shared
            model(input_ids=ids(shape.rows, width), use_cache=False, **kwargs)
    finally:
        model.set_output_embeddings(head)
        model.train(was_training)
    return sum(saved.values())


def _activations_from_shapes(model_config, shape: Shape) -> int:
    """What a block keeps for backward when the meta forward cannot run the model: per token and block,
    12 hidden-wide and 2.5 MLP-wide fp32 vectors (norms, projections, attention inputs and output, the
    MLP's inputs and products), fitted to the meta count of the default model's LoRA and full steps
    (LoRA within 1%, full within 11%, at 4 x 256 and 8 x 103 tokens)."""
    text = model_config.get_text_config()
    wide = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    tokens = shape.rows * (shape.width - shape.shared) + shape.shared
    return 2 * tokens * text.num_hidden_layers * (24 * text.hidden_size + 5 * wide)


def _inactive_expert_weights(model: nn.Module, model_config) -> int:
    """The expert weights a token does not run through: all but the k routed experts of each MoE block."""
    family = family_of(model_config)
    text = model_config.get_text_config()
    n = next((getattr(text, k) for k in ("num_local_experts", "num_experts") if getattr(text, k, None)), 0)
    k = getattr(text, "num_experts_per_tok", 0) or 0
    if not family.experts or not n or not k:
        return 0
    names = {name.replace(".base_layer", ""): p for name, p in model.named_parameters()}  # LoRA on experts wraps them
    experts = sum(p.numel() for name, p in names.items() if any(name.endswith(e) for e in family.experts))
    return int(experts * (1 - k / n))


def _meta_model(cfg: RunCfg, model_config):
    model_config = copy.deepcopy(model_config)  # its attention is the probe's, not the real model's
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.config._attn_implementation = PROBE_ATTENTION
    method = get_method(cfg.method.name)
    if method.KIND == "probe":
        return model, method, {}
    _, trainable = prepare(model, method, cfg)  # as the run prepares it
    return model, method, trainable


def estimate(cfg: RunCfg, shapes: list[Shape] | None = None, n_examples: int | None = None,
             flops_per_s: float | None = None, model_config=None, world: int = 1,
             batches_per_epoch: int | None = None, holds_frozen: bool = True) -> Estimate:
    """The cost of ``cfg``. ``shapes`` are the micro-batches of one epoch (``batch_shapes`` gives them
    from the data); without them every batch is taken to be full rows of ``data.max_length`` tokens
    with loss on every token, no prefix shared (an upper bound). ``model_config`` (a transformers
    config) describes the model instead of ``cfg.model``; ``world``: the processes that share each step
    (torchrun's). The run passes ``batches_per_epoch`` (its data's micro-batches); else an epoch is
    ``n_examples`` in batches of ``train.batch_size``. The steps are counted as the loop counts them
    (``TrainCfg.steps``). ``holds_frozen``: the run loads the model itself, so under bf16 or fp16 it holds the
    frozen linear layers in that dtype (``precision.hold_frozen_linears``)."""
    model_config = model_config or AutoConfig.from_pretrained(resolve_spec(cfg.model))
    model, method, trainable = _meta_model(cfg, model_config)
    probe = method.KIND == "probe"
    n_trainable = sum(p.numel() for p in trainable.values())
    n_total = parameter_count(model)  # a tied head once, a 4-bit weight by its shape
    device = resolve_device(cfg.train.device, visible=flops_per_s is None)  # a given rate: another machine's
    kind = device.type if device.type in STEP_EFFICIENCY else "cpu"
    b, length = cfg.train.batch_size, cfg.data.max_length
    shapes = shapes or [Shape(b, length, 0, b * length)]
    family = family_of(model_config)
    shortcut = family.head_shortcut(model_config)  # else the model's own head: whole logits
    if not (shortcut and family.shared_prefix):  # as eval.lm.token_logprobs runs it
        shapes = [dataclasses.replace(s, shared=0) for s in shapes]
    longest = max(shapes, key=lambda s: (s.rows * (s.width - s.shared) + s.shared, s.loss_tokens))
    text = model_config.get_text_config()
    hidden, vocab = text.hidden_size, text.vocab_size

    basis = "meta forward"
    try:
        activations = 0 if probe else saved_bytes(model, longest)
    except Exception:  # a model the meta device cannot run (a kernel with no meta form, a mask it must build)
        activations, basis = _activations_from_shapes(model_config, longest), "config shapes"
    if probe:  # no backward: about one block's activations at a time, and the hidden states read out
        activations = 4 * longest.rows * longest.width * hidden * (text.num_hidden_layers + 8)
    # the head: a hidden state per label kept for backward, and a chunk's logits and log-probabilities at once
    head = 4 * longest.loss_tokens * hidden + 2 * 4 * (min(longest.loss_tokens, HEAD_CHUNK) if shortcut
                                                       else longest.loss_tokens) * vocab
    if holds_frozen and not probe and holds_frozen_linears(method, world, cfg.train.fsdp):
        hold_frozen_linears(model, cfg.train.precision, device)  # as the run holds them: bf16 or fp16, 2 bytes each
    parts = {"process": PROCESS_BYTES[kind], "weights": _tensor_bytes(model), "train_state": 12 * n_trainable,
             "activations": activations, "head": 0 if probe else head,
             "allocator": int(ALLOCATOR_SHARE[kind] * activations)}

    # Forward 2 flops per weight per token; backward 2 more for the input gradient, plus 2 per
    # trainable weight for its own gradient. The head runs only where a label is set; a training head
    # under the shortcut recomputes its logits in backward (2 more), where a frozen one needs none.
    head_weights = vocab * hidden
    body = n_total - head_weights - _inactive_expert_weights(model, model_config)  # embeddings: a lookup
    mean = Shape(b, sum(s.width for s in shapes) / len(shapes), sum(s.shared for s in shapes) / len(shapes),
                 sum(s.loss_tokens for s in shapes) / len(shapes))
    computed = mean.rows * (mean.width - mean.shared) + mean.shared  # token positions run per micro-batch
    attention = 4 * text.num_hidden_layers * mean.width * hidden  # scores and weighted values, per token
    per_token = 4 * body + 2 * min(n_trainable, body) + 2 * attention
    per_loss_token = 4 * head_weights + ((4 if shortcut else 2) * head_weights if n_trainable >= n_total else 0)
    if probe:
        per_token, per_loss_token = 2 * body + attention, 0
    elif objectives.module(cfg.train.objective).REFERENCE and not method.WHOLE_MODEL:
        per_token += 2 * body + attention  # the reference: a forward of the same rows with the method off
        per_loss_token += 2 * head_weights
    flops = cfg.train.grad_accum * (computed * per_token + mean.loss_tokens * per_loss_token)
    rate = flops_per_s or matmul_flops_per_s(device)
    calls = 1 + sum(s.shared > 0 for s in shapes) / len(shapes)  # forward calls per micro-batch: a shared prefix's too
    work = {"matmul": flops, **_other_work(model, text, cfg, computed, calls, probe, n_trainable), "rate": rate}
    cost = TIME_COST.get(kind, {"matmul": 1 / STEP_EFFICIENCY[kind]})
    seconds = sum(cost.get(part, 0.0) * units for part, units in work.items() if part != "rate") / rate

    batches_per_epoch = batches_per_epoch or (math.ceil(n_examples / b) if n_examples else None)
    steps = cfg.train.steps(batches_per_epoch, world) if batches_per_epoch else cfg.train.max_steps
    return Estimate(n_total, n_trainable, parts, longest, int(cfg.train.grad_accum * mean.rows * mean.width),
                    float(flops), seconds, work, steps, device.type, basis)


def _other_work(model: nn.Module, text, cfg: RunCfg, positions: float, calls: float, probe: bool,
                n_trainable: int) -> dict:
    """A step's units of the work beside the matmuls (see TIME_COST): per micro-batch, ``positions`` token
    positions run through every block, in ``calls`` forward calls (two where a prefix is shared)."""
    runs = cfg.train.grad_accum * positions
    wide = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    dropping = [m.lora_A.in_features for m in model.modules()
                if isinstance(m, LoRALinear) and isinstance(m.dropout, nn.Dropout) and m.dropout.p > 0]
    quantized = sum(math.prod(m.state.shape) for m in model.modules() if isinstance(m, NF4Linear))
    passes = 1 if probe else 2  # forward, and backward's second look at each activation and weight
    return {"elementwise": passes * runs * text.num_hidden_layers * (text.hidden_size + wide),
            "dropout": 0 if probe else runs * sum(dropping),
            "dropout_calls": 0 if probe else cfg.train.grad_accum * calls * len(dropping),
            "dequantize": passes * cfg.train.grad_accum * quantized, "optimizer": 0 if probe else n_trainable,
            "blocks": passes * cfg.train.grad_accum * calls * text.num_hidden_layers}


def batch_shapes(examples, batches: list[list[int]], pad_id: int = 0) -> list[Shape]:
    """The shape of each micro-batch ``batches`` (lists of indices) makes of ``examples``: rows, width,
    the prefix its rows share (as ``eval.lm.token_logprobs`` finds it) and its loss tokens."""
    collate, shapes = Collator(pad_id), []
    for indices in batches:
        batch = collate([examples[i] for i in indices])
        keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        keep[:, :-1] = batch["labels"][:, 1:] != -100
        shapes.append(Shape(len(indices), batch["input_ids"].shape[1],
                            shared_prefix(batch["input_ids"], batch["attention_mask"], keep), int(keep.sum())))
    return shapes
