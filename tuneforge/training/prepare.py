"""A model made ready to train, the same way for a run and for its estimate: the method injected
(unless the caller injected one), the family's speed-ups swapped in (``model/kernels.py``: the same
math, with less kept for backward), and the parameters that train."""

from __future__ import annotations

from torch import nn

from tuneforge.core import config as config_mod
from tuneforge.core.config import RunCfg
from tuneforge.methods._shared import GradientMethod, Injected
from tuneforge.model.kernels import use_lean_modules


def prepare(model: nn.Module, method: GradientMethod, cfg: RunCfg,
            injected: Injected | None = None) -> tuple[Injected, dict[str, nn.Parameter]]:
    """(the method's handle, its trainable parameters by name) of ``model``, readied in place; the
    estimate calls it on a model on the meta device."""
    if injected is None:
        injected = method.inject(model, config_mod.method_config(cfg))
    params = injected.trainable(model)
    use_lean_modules(model)
    return injected, params
