"""The fine-tuning methods. Each is a module that provides:

    Config: type                        frozen dataclass; keys follow PEFT's where PEFT has the method
    PEFT_TYPE: str | None               "LORA", "PROMPT_TUNING", ... or None (tuneforge's own format)
    inject(model, cfg) -> None          freeze the base, add the method's parameters; a second inject raises
    trainable(model) -> {name: Parameter}   found by module type, never by name
    state_dict(model) -> {key: Tensor}  the method's tensors only, keys as written on disk
    load_state_dict(model, sd) -> None  the inverse; a shape or key mismatch is a UserError
    merge(model) -> None                fold into the base weights where the math allows; else raise

The training loop is handed ``trainable(model)`` and never a method name.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."  # what PEFT puts before a module path in adapter_model.safetensors

def get_method(name: str) -> ModuleType:
    from tuneforge.errors import UserError

    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}", fix=f"use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def mark_injected(model: nn.Module, name: str, cfg) -> None:
    """Record the method on the model; a second inject of any method is refused."""
    if getattr(model, "tuneforge_method", None) is not None:
        raise RuntimeError(f"a method ({model.tuneforge_method[0]}) is already injected into this model")
    model.tuneforge_method = (name, cfg)


def parameter_count(model: nn.Module) -> int:
    """Weights in the model, counting a quantized layer's weight by its shape: a 4-bit weight is
    still a weight (its packed codes are buffers, not parameters)."""
    from tuneforge.quant.nf4 import NF4Linear

    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return sum(p.numel() for p in model.parameters()) + quantized


def prefixed_state(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """A method's tensors under PEFT's keys: its state dict is its trainable tensors, prefixed."""
    return {PEFT_PREFIX + key: p.detach() for key, p in params.items()}


@torch.no_grad()
def load_prefixed(params: dict[str, nn.Parameter], sd: dict[str, torch.Tensor], fix: str) -> None:
    """Copy ``sd`` (PEFT's keys) into ``params``; a missing, unexpected or misshapen tensor is a
    UserError naming it, with ``fix`` saying which config setting to check."""
    from tuneforge.errors import UserError

    params = {PEFT_PREFIX + key: p for key, p in params.items()}
    missing, unexpected = sorted(params.keys() - sd.keys()), sorted(sd.keys() - params.keys())
    if missing or unexpected:
        what = f"tensor {missing[0]!r} is missing" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise UserError(f"{what} ({len(missing)} missing, {len(unexpected)} unexpected)", fix=fix)
    for key, p in params.items():
        if p.shape != sd[key].shape:
            raise UserError(f"tensor {key!r} has shape {tuple(sd[key].shape)}, the model expects {tuple(p.shape)}",
                            fix=fix)
        p.copy_(sd[key])


# Imported last: each method module uses mark_injected from here.
from tuneforge.methods import adapter, features, full, ia3, lora, prefix, prompt, qlora  # noqa: E402

REGISTRY: dict[str, ModuleType] = {
    "full": full, "lora": lora, "qlora": qlora, "adapter": adapter, "prefix": prefix, "prompt": prompt, "ia3": ia3,
    "features": features,
}
