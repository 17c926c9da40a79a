"""(IA)^3 (Liu et al. 2022): learned vectors that rescale activations, elementwise.

For the key and value projections the vector l scales the layer's output, y = l * (W x + b); for the
MLP's down-projection (a "feedforward" module) it scales the layer's input, y = W (l * x) + b. The
vectors start at ones, so training starts from the base model, and they fold into the weights
exactly: l * W scales rows, W * l scales columns. Keys, shapes and math follow PEFT's IA3, so the
adapters it writes load there and back:

    base_model.model.<module path>.ia3_l    (out_features, 1), or (1, in_features) for a feedforward layer
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tuneforge.model import targets
from tuneforge.model.families import family_of
from tuneforge.core.errors import UserError
from tuneforge.methods._shared import (WRAPPABLE, Injected, MethodModule, base_weight, before_inject, device_of,
                                       find_targets, fold, in_out, injected, leaf_names, merge_wrapped, modules_of,
                                       no_lora_form, peft_keys, same_config, wrap, wrapper_hooks)
from tuneforge.core.config.methods import IA3Config as Config

NAME, KIND, PEFT_TYPE, WHOLE_MODEL, MERGES = "ia3", "gradient", "IA3", False, True
ADDS = None  # its change is a change of weights


class IA3Linear(nn.Module, MethodModule):
    """``base_layer`` with its output (or, if ``is_feedforward``, its input) scaled by ``ia3_l``."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, cfg: Config):
        super().__init__()
        self.base_layer, self.is_feedforward = base_layer, is_feedforward
        device = device_of(base_layer)
        n_in, n_out = in_out(base_layer)
        shape = (1, n_in) if is_feedforward else (n_out, 1)  # PEFT's shapes
        self.ia3_l = nn.Parameter(torch.ones(shape, device=device) if cfg.init_ia3_weights
                                  else torch.randn(shape, device=device))

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if not self.enabled:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()  # (in,) or (out,)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The plain layer with the vector folded in: the base itself, changed in place, or a dense copy of a
        quantized base."""
        # (out, 1) scales rows; (1, in) scales columns
        base = fold(self.base_layer, base_weight(self.base_layer).float() * self.ia3_l)
        if base.bias is not None and not self.is_feedforward:  # an output scale scales the bias too
            base.bias.copy_(base.bias.float() * self.ia3_l.flatten())
        return base


def find(model: nn.Module, cfg: Config) -> tuple[list[str], set[str], list[str]]:
    """The layers to wrap, those of them that are feedforward, and the whole modules to save."""
    family = family_of(model)
    names = family.ia3 if cfg.target_modules is None else cfg.target_modules
    wrapped, saved = find_targets(model, names, cfg.modules_to_save, "IA3")
    ff = cfg.feedforward_modules
    if ff is None:  # the family's MLP output, where the targets took it
        ff = [name for name in family.ia3_feedforward if any(targets.selects(path, name) for path in wrapped)]
    feedforward = set(targets.find(model, ff, types=WRAPPABLE, key="feedforward_modules")) if ff else set()
    if outside := sorted(feedforward - set(wrapped)):
        raise UserError(f"feedforward_modules selects {outside[0]}, which target_modules does not",
                        "feedforward_modules", fix="list the feedforward layers in target_modules too")
    return wrapped, feedforward, saved


def inject(model: nn.Module, cfg: Config) -> Injected:
    base = before_inject(model)
    wrapped, feedforward, saved = find(model, cfg)
    wrap(model, wrapped, lambda path, base: IA3Linear(base, path in feedforward, cfg), saved)
    return injected(__name__, cfg, base)


def layers(model: nn.Module) -> dict[str, IA3Linear]:
    return modules_of(model, IA3Linear)


# Each layer's ia3_l, then modules_to_save; the file holds them under PEFT's keys.
trainable, state_dict, load_state_dict = wrapper_hooks(
    (IA3Linear,), "check target_modules and feedforward_modules: a feedforward vector is (1, in), any other (out, 1)")
for_loading = same_config


def merge(model: nn.Module, cfg: Config | None = None) -> None:
    """Fold every vector into its layer's weights and put the plain layer back."""
    merge_wrapped(model, IA3Linear)


def file_config(model: nn.Module, cfg: Config) -> dict:
    """PEFT's IA3Config keys."""
    feedforward = [path for path, layer in layers(model).items() if layer.is_feedforward]
    return {**peft_keys(PEFT_TYPE, model, IA3Linear, cfg), "feedforward_modules": leaf_names(model, feedforward),
            "init_ia3_weights": cfg.init_ia3_weights}


def lora_form(model: nn.Module, cfg: Config | None = None) -> dict:
    no_lora_form("IA3 rescales activations by learned vectors")
