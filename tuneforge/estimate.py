"""What a run will cost before it starts: parameters, memory and time per step.

The model is built on the meta device from its config (no weights are read), the method is
injected into it, and the counts follow. Memory is weights + gradients + AdamW's two moments +
activations; time is the step's floating-point work over the device's measured matmul rate,
scaled by an efficiency measured on real runs (a step also does attention, norms and the
optimizer, which run below peak matmul speed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tuneforge import config as config_mod
from tuneforge.config import RunCfg
from tuneforge.devices import resolve_device
from tuneforge.io.load import resolve_spec
from tuneforge.methods._shared import parameter_count
from tuneforge.methods.registry import get_method

# Fraction of peak matmul throughput a training step achieves, measured on the default model
# (fp32, 2-core CPU); see docs/estimate.md.
STEP_EFFICIENCY = {"cpu": 0.55, "cuda": 0.35}


@dataclass(frozen=True)
class Estimate:
    total_params: int
    trainable_params: int
    weight_bytes: int
    train_state_bytes: int  # gradients and optimizer moments of the trainable parameters
    activation_bytes: int
    tokens_per_step: int
    flops_per_step: float
    seconds_per_step: float
    steps: int | None

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.train_state_bytes + self.activation_bytes

    def describe(self) -> str:
        gib = 2**30
        total = f", about {self.steps * self.seconds_per_step / 60:.1f} min for {self.steps} steps" if self.steps else ""
        return (f"estimate: {self.trainable_params:,} trainable of {self.total_params:,} parameters "
                f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%); memory about "
                f"{self.peak_bytes / gib:.2f} GiB (weights {self.weight_bytes / gib:.2f}, gradients and optimizer "
                f"{self.train_state_bytes / gib:.2f}, activations {self.activation_bytes / gib:.2f}); "
                f"{self.seconds_per_step:.1f} s per step of {self.tokens_per_step:,} tokens{total}")


def matmul_flops_per_s(device: torch.device, size: int = 1024, repeats: int = 4) -> float:
    """The device's fp32 matmul rate, measured in a fraction of a second."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def estimate(cfg: RunCfg, tokens_per_example: float | None = None, loss_tokens_per_example: float | None = None,
             n_examples: int | None = None, flops_per_s: float | None = None, model_config=None) -> Estimate:
    """Estimate the cost of ``cfg``. Without data statistics, every example is taken to fill
    ``data.max_length`` with loss on every token (an upper bound). A probe method (features) trains
    nothing in the model: its cost is one forward pass per text, without gradients. ``model_config``
    (a transformers config) describes the model instead of ``cfg.model``."""
    model_config = model_config or AutoConfig.from_pretrained(resolve_spec(cfg.model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    method = get_method(cfg.method.name)
    probe = method.KIND == "probe"
    if not probe:
        trainable = method.inject(model, config_mod.method_config(cfg)).trainable(model)
    n_trainable = 0 if probe else sum(p.numel() for p in trainable.values())
    n_total = parameter_count(model)  # a tied head once, a 4-bit weight by its shape

    device = resolve_device(cfg.train.device)
    tokens = tokens_per_example or cfg.data.max_length
    loss_tokens = loss_tokens_per_example or tokens
    batch = cfg.train.batch_size * cfg.train.grad_accum
    hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
    vocab = model_config.vocab_size
    head = vocab * hidden
    body = n_total - head  # the tied input embedding is a lookup: no matmul work
    # Forward 2 flops per weight per token; backward 2 more for the input gradient, plus 2 per
    # trainable weight for its own gradient. The head runs only where a label is set.
    attention = 4 * layers * tokens * hidden  # scores and weighted values, per token
    per_token = 4 * body + 2 * min(n_trainable, body) + 2 * attention
    per_loss_token = 4 * head + (2 * head if n_trainable >= n_total else 0)
    if probe:  # forward only, and no head: hidden states are the output
        per_token, per_loss_token = 2 * body + attention, 0
    flops = batch * (tokens * per_token + loss_tokens * per_loss_token)
    rate = (flops_per_s or matmul_flops_per_s(device)) * STEP_EFFICIENCY.get(device.type, 0.5)

    # Activations kept for backward, per layer: s·b·h·(34 + 5·a·s/h) bytes in 16-bit precision
    # (Korthikanti et al., 2022), twice that in fp32; plus the selected logits and their gradient.
    heads, b = model_config.num_attention_heads, cfg.train.batch_size
    per_layer = tokens * b * hidden * (34 + 5 * heads * tokens / hidden)
    activations = 2 * layers * per_layer + 8 * b * loss_tokens * vocab
    if probe:  # nothing kept for a backward pass: about one layer's worth at a time, and every hidden state
        activations = 2 * per_layer + 4 * b * tokens * hidden * (layers + 1)
    steps = cfg.train.max_steps
    if steps is None and n_examples:
        steps = max(1, round(cfg.train.epochs * n_examples / batch))
    return Estimate(n_total, n_trainable, _tensor_bytes(model), 12 * n_trainable, int(activations),
                    int(batch * tokens), float(flops), flops / rate, steps)
