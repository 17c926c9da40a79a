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
from transformers.pytorch_utils import Conv1D

from tuneforge.model import targets
from tuneforge.model.families import family_of
from tuneforge.core.errors import UserError
from tuneforge.methods._shared import (Injected, MethodModule, base_weight, before_inject, dense_copy, device_of,
                                       in_out, injected, leaf_names, modules_of, no_lora_form, prefixed_hooks,
                                       same_config, saved_modules, saved_parameters, wrap, write_weight)
from tuneforge.core.config.methods import IA3Config as Config
from tuneforge.quant.nf4 import NF4Linear

NAME, KIND, PEFT_TYPE, WHOLE_MODEL, MERGES = "ia3", "gradient", "IA3", False, True
WRAPPABLE = (*targets.LINEAR, NF4Linear)


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
        scale = self.ia3_l.flatten()  # (in,) or (out,)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The plain layer with the vector folded in: the base itself, changed in place, or a dense copy of a
        quantized base."""
        base = self.base_layer
        folded = base_weight(base).float() * self.ia3_l  # (out, 1) scales rows; (1, in) scales columns
        if isinstance(base, NF4Linear):
            base = dense_copy(base, folded)
        else:
            write_weight(base, folded)
        if base.bias is not None and not self.is_feedforward:  # an output scale scales the bias too
            base.bias.copy_(base.bias.float() * self.ia3_l.flatten())
        return base


def find(model: nn.Module, cfg: Config) -> tuple[list[str], set[str], list[str]]:
    """The layers to wrap, those of them that are feedforward, and the whole modules to save."""
    family = family_of(model)
    wrapped = targets.find(model, family.ia3 if cfg.target_modules is None else cfg.target_modules, types=WRAPPABLE)
    ff = cfg.feedforward_modules
    if ff is None:  # the family's MLP output, where the targets took it
        ff = [name for name in family.ia3_feedforward if any(targets.selects(path, name) for path in wrapped)]
    feedforward = set(targets.find(model, ff, types=WRAPPABLE, key="feedforward_modules")) if ff else set()
    if outside := sorted(feedforward - set(wrapped)):
        raise UserError(f"feedforward_modules selects {outside[0]}, which target_modules does not",
                        "feedforward_modules", fix="list the feedforward layers in target_modules too")
    return wrapped, feedforward, saved_modules(model, cfg.modules_to_save, wrapped, "IA3")


def inject(model: nn.Module, cfg: Config) -> Injected:
    base = before_inject(model)
    wrapped, feedforward, saved = find(model, cfg)
    wrap(model, wrapped, lambda path, base: IA3Linear(base, path in feedforward, cfg))
    for path in saved:
        model.get_submodule(path).requires_grad_(True)
    return injected(__name__, cfg, base)


def layers(model: nn.Module) -> dict[str, IA3Linear]:
    return modules_of(model, IA3Linear)


def trainable(model: nn.Module, cfg: Config) -> dict[str, nn.Parameter]:
    params = {f"{path}.ia3_l": layer.ia3_l for path, layer in layers(model).items()}
    return {**params, **saved_parameters(model, saved_modules(model, cfg.modules_to_save, [], "IA3"))}


# The file holds the trainable tensors under PEFT's keys.
state_dict, load_state_dict = prefixed_hooks(
    trainable, fix="check target_modules and feedforward_modules: a feedforward vector is (1, in), any other (out, 1)")
for_loading = same_config


@torch.no_grad()
def merge(model: nn.Module, cfg: Config | None = None) -> None:
    """Fold every vector into its layer's weights and put the plain layer back."""
    for path, layer in layers(model).items():
        targets.swap(model, path, lambda _: layer.merged())


def file_config(model: nn.Module, cfg: Config) -> dict:
    """PEFT's IA3Config keys. modules_to_save lists full paths: PEFT matches those as bare suffixes."""
    wrapped = layers(model)
    return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "target_modules": leaf_names(model, list(wrapped)),
            "feedforward_modules": leaf_names(model, [p for p, layer in wrapped.items() if layer.is_feedforward]),
            "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in wrapped.values()),
            "init_ia3_weights": cfg.init_ia3_weights,
            "modules_to_save": saved_modules(model, cfg.modules_to_save, [], "IA3") or None, "inference_mode": True}


def lora_form(model: nn.Module, cfg: Config | None = None) -> dict:
    no_lora_form("IA3 rescales activations by learned vectors")
