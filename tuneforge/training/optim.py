"""Optimizer parameter groups and learning-rate schedules, as pure functions."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(params: dict[str, nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms and other vectors are left alone."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(params: dict[str, nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, in torch's fused kernel when every parameter is on the CPU or every one on CUDA (the devices this
    project runs on): one pass over each tensor's weight, gradient and moments where the default takes one per
    operation. Measured with 2 CPU threads on the default model: LoRA's update (r=16, every linear layer) 4 ms
    against 22, full fine-tuning's 85 against 372. A checkpoint's optimizer state resumes into it whatever
    kernel wrote it (``checkpoint.RUNTIME_KEYS``)."""
    devices = {p.device.type for p in params.values()}
    fused = devices in ({"cpu"}, {"cuda"})
    return torch.optim.AdamW(param_groups(params, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused or None)


def lr_multiplier(step: int, total: int, warmup: int, kind: str) -> float:
    """The learning rate at ``step`` (0-based) as a fraction of the peak: linear warm-up, then
    cosine or linear decay to zero at ``total``, or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")
