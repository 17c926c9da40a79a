"""How a step computes: an autocast context (none in fp32; ``model/devices.py`` resolves ``auto``, and
evaluation runs in the same context) and a loss scaler that works only in fp16. The scaler is always
there: ``GradScaler(enabled=False)`` passes the loss and the step through unchanged, so the loop calls
it without asking whether it is fp16.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from tuneforge.model.devices import DTYPES, autocast, resolve_precision
from tuneforge.model.targets import output_head


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


def holds_frozen_linears(method, world: int, fsdp: bool) -> bool:
    """Whether a run of ``method`` (its module) on ``world`` processes holds its frozen linear layers in half
    precision (``hold_frozen_linears``): not where the model is saved whole (full fine-tuning), nor sharded."""
    return not method.WHOLE_MODEL and not (world > 1 and fsdp)


@torch.no_grad()
def hold_frozen_linears(model: nn.Module, name: str, device: torch.device) -> int:
    """Under bf16 or fp16 autocast (``name``, as ``train.precision`` says it), hold the weight and bias of every
    frozen plain linear layer in that dtype, and return the bytes this frees.

    Autocast casts a linear layer's float32 weight and bias to its dtype anew at every forward, rounding to
    nearest as ``Tensor.to`` does: a layer holding them cast already computes the same numbers, without the
    casts' passes and at half the memory. Left in float32, because they are read outside a linear layer under
    autocast: the output head (``kernels.head_logprobs`` reads it in backward), a weight that another module
    shares (tied embeddings), and a DoRA layer's base (its row norms). The model must then run under
    autocast only, as a run's training and evaluation do once it has held them; a model of the caller's, and
    a model saved whole (full fine-tuning's), are not for this."""
    precision = resolve_precision(name, device)
    if precision == "fp32":
        return 0
    dtype = DTYPES[precision]
    holders = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    keep = {id(output_head(model))} | {id(m.base_layer) for m in model.modules()
                                       if getattr(m, "lora_magnitude_vector", None) is not None}
    freed = 0
    for module in model.modules():
        params = [p for p in module._parameters.values() if p is not None]
        if (type(module) is not nn.Linear or id(module) in keep
                or any(p.requires_grad or p.dtype != torch.float32 or holders[id(p)] > 1 for p in params)):
            continue
        for p in params:
            p.data = p.data.to(dtype)
            freed += p.numel() * (4 - p.element_size())
    return freed
