"""Name -> method: the one table a name from a config file or an adapter's record is looked up in."""

from __future__ import annotations

from tuneforge.core.errors import UserError
from tuneforge.methods import adapter, features, full, ia3, lora, prefix, prompt, qlora
from tuneforge.methods._shared import GradientMethod, ProbeMethod

REGISTRY: dict[str, GradientMethod | ProbeMethod] = {
    m.NAME: m for m in (full, lora, qlora, adapter, ia3, prefix, prompt, features)}


def get_method(name: str) -> GradientMethod | ProbeMethod:
    """The method called ``name`` (a module that implements GradientMethod, or ProbeMethod for features)."""
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}", fix=f"use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def by_peft_type(peft_type: str | None) -> GradientMethod:
    """The method whose adapters PEFT writes with ``peft_type`` ("LORA" is LoRA's, not QLoRA's)."""
    names = [n for n, m in REGISTRY.items() if peft_type and m.PEFT_TYPE == peft_type]
    if not names:
        known = sorted({m.PEFT_TYPE for m in REGISTRY.values() if m.PEFT_TYPE})
        what = f"peft_type {peft_type!r} is not a method tuneforge has" if peft_type else \
            "the adapter names neither a peft_type nor a tuneforge method"
        raise UserError(what, fix=f"tuneforge reads {', '.join(known)} adapters and its own")
    return REGISTRY[peft_type.lower() if peft_type.lower() in names else names[0]]
