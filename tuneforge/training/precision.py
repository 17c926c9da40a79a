"""How a step computes: an autocast context (none in fp32; ``model/devices.py`` resolves ``auto``, and
evaluation runs in the same context) and a loss scaler that works only in fp16. The scaler is always
there: ``GradScaler(enabled=False)`` passes the loss and the step through unchanged, so the loop calls
it without asking whether it is fp16.
"""

from __future__ import annotations

import torch

from tuneforge.model.devices import autocast, resolve_precision


class Precision:
    def __init__(self, name: str, device: torch.device):
        self.name, self.device = resolve_precision(name, device), device
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.name == "fp16")

    def autocast(self):
        """The context a forward pass runs in."""
        return autocast(self.name, self.device)

    @property
    def skips_nonfinite(self) -> bool:
        """fp16's scaler skips a step whose gradients overflow, and lowers its scale: that is no error."""
        return self.scaler.is_enabled()
