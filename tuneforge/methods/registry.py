"""A method by name: the rows of ``core.config.methods.METHODS`` (the one table of methods), their modules
imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from tuneforge.core.config.methods import METHODS
from tuneforge.core.errors import UserError
from tuneforge.methods._shared import GradientMethod, ProbeMethod


def get_method(name: str) -> GradientMethod | ProbeMethod:
    """The method called ``name`` (a module that implements GradientMethod, or ProbeMethod for features)."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}", fix=f"use one of {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name].module)


class _Modules(Mapping):
    """``METHODS`` read as name -> module."""

    def __getitem__(self, name: str) -> GradientMethod | ProbeMethod:
        if name not in METHODS:
            raise KeyError(name)
        return get_method(name)

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS)

    def __len__(self) -> int:
        return len(METHODS)


REGISTRY: Mapping[str, GradientMethod | ProbeMethod] = _Modules()  # a view of METHODS, not a second table


def by_peft_type(peft_type: str | None) -> GradientMethod:
    """The method whose adapters PEFT writes with ``peft_type`` ("LORA" is LoRA's, not QLoRA's)."""
    names = [n for n, m in REGISTRY.items() if peft_type and m.PEFT_TYPE == peft_type]
    if not names:
        known = sorted({m.PEFT_TYPE for m in REGISTRY.values() if m.PEFT_TYPE})
        what = f"peft_type {peft_type!r} is not a method tuneforge has" if peft_type else \
            "the adapter names neither a peft_type nor a tuneforge method"
        raise UserError(what, fix=f"tuneforge reads {', '.join(known)} adapters and its own")
    return REGISTRY[peft_type.lower() if peft_type.lower() in names else names[0]]
