"""(IA)^3 (Liu et al. 2022): learned vectors that rescale activations, elementwise.

For the key and value projections the vector l scales the layer's output, y = l * (W x + b); for the
MLP's down-projection (a "feedforward" module) it scales the layer's input, y = W (l * x) + b. The
vectors start at ones, so training starts from the base model, and they fold into the weights
exactly: l * W scales rows, W * l scales columns. Keys, shapes and math follow PEFT's IA3, so the
adapters it writes load there and back:

    base_model.model.<module path>.ia3_l    (out_features, 1), or (1, in_features) for a feedforward layer
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tuneforge import targets
from tuneforge.errors import UserError
from tuneforge.methods import load_prefixed, mark_injected, prefixed_state
from tuneforge.quant.nf4 import NF4Linear

PEFT_TYPE = "IA3"
WRAPPABLE = (nn.Linear, NF4Linear)
REGEX_CHARS = set("*+?()[]{}|\\^$")


def _as_pattern(names):
    """The config parser reads a lone string as a one-item list; a regex or "all-linear" is a string."""
    if isinstance(names, list) and len(names) == 1 and (names[0] == "all-linear" or REGEX_CHARS & set(names[0])):
        return names[0]
    return names


@dataclass(frozen=True)
class Config:
    # leaf names, a regular expression over module paths, or "all-linear"
    target_modules: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    # those targets whose input, not output, is scaled (PEFT requires them to be among the targets)
    feedforward_modules: list[str] | str = field(default_factory=lambda: ["down_proj"])
    modules_to_save: list[str] | None = None  # whole modules trained and saved besides the vectors
    init_ia3_weights: bool = True  # True: vectors of ones (identity at start); False: random normal, as PEFT

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _as_pattern(self.target_modules))
        object.__setattr__(self, "feedforward_modules", _as_pattern(self.feedforward_modules))


class IA3Linear(nn.Module):
    """``base_layer`` with its output (or, if ``is_feedforward``, its input) scaled by ``ia3_l``."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, cfg: Config):
        super().__init__()
        self.base_layer, self.is_feedforward = base_layer, is_feedforward
        device = next(iter([*base_layer.parameters(), *base_layer.buffers()])).device
        shape = (1, base_layer.in_features) if is_feedforward else (base_layer.out_features, 1)  # PEFT's shapes
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
        dequantize = getattr(base, "dequantize", None)
        weight = dequantize() if callable(dequantize) else base.weight  # (out, in)
        folded = weight.float() * self.ia3_l  # (out, 1) scales rows; (1, in) scales columns
        if callable(dequantize):
            base = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                             device=weight.device, dtype=weight.dtype).requires_grad_(False)
            if base.bias is not None:
                base.bias.copy_(self.base_layer.bias)
        base.weight.copy_(folded)
        if base.bias is not None and not self.is_feedforward:  # an output scale scales the bias too
            base.bias.copy_(base.bias.float() * self.ia3_l.flatten())
        return base


def _saved(model: nn.Module, cfg: Config) -> list[str]:
    names = cfg.modules_to_save
    return targets.find(model, names, types=(nn.Module,), key="modules_to_save") if names else []


def _find(model: nn.Module, cfg: Config) -> tuple[list[str], set[str], list[str]]:
    """The layers to wrap, those of them that are feedforward, and the whole modules to save."""
    wrapped = targets.find(model, cfg.target_modules, types=WRAPPABLE)
    ff = cfg.feedforward_modules
    feedforward = set(targets.find(model, ff, types=WRAPPABLE, key="feedforward_modules")) if ff else set()
    if outside := sorted(feedforward - set(wrapped)):
        raise UserError(f"feedforward_modules selects {outside[0]}, which target_modules does not",
                        "feedforward_modules",
                        fix="list the feedforward layers in target_modules too")
    saved = _saved(model, cfg)
    for s in saved:
        if clash := [w for w in wrapped if w == s or w.startswith(s + ".") or s.startswith(w + ".")]:
            raise UserError(f"modules_to_save entry {s!r} overlaps the IA3 targets {clash[:3]}", "modules_to_save",
                            fix="save a module that no target lies in, or drop it from target_modules")
    return wrapped, feedforward, saved


def inject(model: nn.Module, cfg: Config) -> None:
    mark_injected(model, "ia3", cfg)  # raises if any method is already in
    try:
        wrapped, feedforward, saved = _find(model, cfg)
    except UserError:
        model.tuneforge_method = None  # nothing changed: the user can fix the names and retry
        raise
    model.requires_grad_(False)
    for path in wrapped:
        targets.swap(model, path, lambda base: IA3Linear(base, path in feedforward, cfg))
    for path in saved:
        model.get_submodule(path).requires_grad_(True)


def layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {f"{path}.ia3_l": layer.ia3_l for path, layer in layers(model).items()}
    for path in _saved(model, model.tuneforge_method[1]):
        params.update({f"{path}.{key}": p for key, p in model.get_submodule(path).named_parameters()})
    return params


def state_dict(model: nn.Module) -> dict[str, Tensor]:
    return prefixed_state(trainable(model))


def load_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    load_prefixed(trainable(model), sd,
                  fix="check target_modules and feedforward_modules: a feedforward vector "
                      "is (1, in), any other (out, 1)")


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every vector into its layer's weights and put the plain layer back."""
    for path, layer in layers(model).items():
        targets.swap(model, path, lambda _: layer.merged())


def _names(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names when they select exactly ``paths``, else the full paths: PEFT then picks the same layers."""
    if not paths:
        return []
    leaves = sorted({path.rsplit(".", 1)[-1] for path in paths})
    return leaves if set(targets.find(model, leaves, types=(nn.Module,))) == set(paths) else paths


def peft_config(cfg: Config, model: nn.Module) -> dict:
    """PEFT's IA3Config keys. modules_to_save lists full paths: PEFT matches those as bare suffixes."""
    wrapped = layers(model)
    return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "target_modules": _names(model, list(wrapped)),
            "feedforward_modules": _names(model, [p for p, layer in wrapped.items() if layer.is_feedforward]),
            "fan_in_fan_out": False, "init_ia3_weights": cfg.init_ia3_weights,
            "modules_to_save": _saved(model, cfg) or None, "inference_mode": True}
