"""How a step computes: an autocast context (none in fp32) and a loss scaler that works only in fp16.

``auto`` is bf16 on CUDA and fp32 elsewhere. On a CPU without bf16 matrix units fp32 matmuls are the
fastest; one with them (AMX) multiplies bf16 several times faster, but bf16 changes the numbers a step
computes, so there it is asked for by name (``bench/precision.py`` measures what it gives). The scaler is
always there: ``GradScaler(enabled=False)`` passes the loss and the step through unchanged, so the
loop calls it without asking whether it is fp16.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device):
        if name == "auto":
            name = "bf16" if device.type == "cuda" else "fp32"
        self.name, self.dtype, self.device_type = name, DTYPES[name], device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self):
        """The context a forward pass runs in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def skips_nonfinite(self) -> bool:
        """fp16's scaler skips a step whose gradients overflow, and lowers its scale: that is no error."""
        return self.scaler.is_enabled()
