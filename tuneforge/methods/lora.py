"""LoRA: a frozen linear layer plus a trainable low-rank update, y = W0 x + s * B A x.

A (r x in) starts random and B (out x r) at zero, so training starts from the base model. The
scale s is alpha / r, or alpha / sqrt(r) with rsLoRA (a rank-independent learning dynamic). DoRA
(Liu et al. 2024) splits each output row into a direction, W0 + s B A normalised, and a learned
magnitude m: y = m / ||W0 + s B A|| * (W0 x + s B A x) + b, the norm held constant in backward.
Keys and math follow PEFT, so the adapters it writes load there and back.

The experts of a Mixture-of-Experts block are 3-D parameters: ``target_parameters`` gives each expert
its own update, in PEFT's format (``methods/_experts.py``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import _global_backward_hooks as _backward_hooks
from torch.nn.modules.module import _global_backward_pre_hooks as _backward_pre_hooks
from torch.nn.modules.module import _global_forward_hooks as _forward_hooks
from torch.nn.modules.module import _global_forward_pre_hooks as _forward_pre_hooks

from tuneforge.model import targets
from tuneforge.core.errors import TuneforgeWarning, UserError
from tuneforge.model.families import family_of
from tuneforge.model.kernels import lora_linear, lora_update
from tuneforge.methods._experts import LoRAExperts, expert_layers, find_parameters
from tuneforge.methods._shared import (Injected, MethodModule, base_weight, before_inject, device_of, find_targets,
                                       fold, in_out, injected, lora_pair, merge_wrapped, modules_of, peft_keys,
                                       same_config, saved_paths, wrap, wrapper_hooks, write_weight)
from tuneforge.core.config.methods import LoraConfig as Config
from tuneforge.quant.nf4 import NF4Linear

NAME, KIND, PEFT_TYPE, WHOLE_MODEL, MERGES = "lora", "gradient", "LORA", False, True
ADDS = None  # its change is a change of weights


def scale(cfg: Config) -> float:
    return cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)


class LoRALinear(nn.Module, MethodModule):
    """``base_layer`` (an nn.Linear or NF4Linear) plus ``lora_A``, ``lora_B`` and, with DoRA,
    ``lora_magnitude_vector``."""

    def __init__(self, base_layer: nn.Module, cfg: Config):
        super().__init__()
        self.base_layer, self.scale = base_layer, scale(cfg)
        self.dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout else nn.Identity()
        n_in, n_out = in_out(base_layer)
        self.lora_A, self.lora_B = lora_pair(n_in, cfg.r, n_out, cfg, device_of(base_layer))
        self.lora_magnitude_vector = None
        if cfg.use_dora:  # ||W0 + s B A|| per row: the identity at the start
            with torch.no_grad():
                self.lora_magnitude_vector = nn.Parameter(row_norm(self.base_weight().float() + self.delta()))
        self.merged, self.enabled = False, True

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """What LoRA trains in this layer, by key under the layer's path (PEFT's keys)."""
        params = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.lora_magnitude_vector is not None:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    def base_weight(self) -> Tensor:  # (out, in), dequantized when the base is quantized
        return base_weight(self.base_layer)

    def delta(self) -> Tensor:  # (out, in) = s * (out, r) @ (r, in)
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def merged_weight(self) -> Tensor:  # (out, in), float32: the one matrix equal to base + adapter
        weight = self.base_weight().float() + self.delta().float()
        if self.lora_magnitude_vector is not None:
            weight = (self.lora_magnitude_vector / row_norm(weight))[:, None] * weight
        return weight

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if (plain := self._plain(x)) is not None:  # the base layer and the update in one function
            p = self._modules["dropout"].p if self.training and type(self._modules["dropout"]) is nn.Dropout else 0.0
            return lora_linear(*plain, self.scale, p)
        result = self.base_layer(x)
        if self.merged or not self.enabled:
            return result
        if self.lora_magnitude_vector is None:  # y = W0 x + s B A drop(x), keeping little for backward
            p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
            return lora_update(result, x, self.lora_A.weight, self.lora_B.weight, self.scale, p)
        xd = self.dropout(x).to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(xd)) * self.scale
        weight = self.base_weight().to(xd.dtype)
        norm = row_norm(weight + self.delta().detach()).detach()  # DoRA 4.3: a constant in backward
        g = self.lora_magnitude_vector / norm  # (out,)
        if self.training and not isinstance(self.dropout, nn.Identity):
            base = F.linear(xd, weight)  # W0 on the dropped-out input, as PEFT
        else:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        return (result + (g - 1) * base + g * lora).to(result.dtype)

    def _plain(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor] | None:
        """x and the base weight and bias and A and B, when this layer is a plain linear base plus its update:
        no DoRA, not merged, enabled, no hook (forward or backward) and no replaced forward on the base layer,
        one dtype, or under autocast, which computes a linear layer in its own dtype (float64 aside): then
        all of them cast to it, as autocast would cast them. Then ``lora_linear`` does the whole layer. Else
        None. Called once per layer and decoded token, so it reads the module's dictionaries directly
        (nn.Module's attribute lookup costs microseconds each)."""
        modules = self._modules
        base = modules["base_layer"]
        if (type(base) is not nn.Linear or self.merged or not self.enabled or self.lora_magnitude_vector is not None
                or base._forward_hooks or base._forward_pre_hooks or _forward_hooks or _forward_pre_hooks
                or base._backward_hooks or base._backward_pre_hooks or _backward_hooks or _backward_pre_hooks
                or "forward" in base.__dict__):
            return None
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        A, B = modules["lora_A"]._parameters["weight"], modules["lora_B"]._parameters["weight"]
        if not x.is_meta and torch.is_autocast_enabled(device := x.device.type):
            if torch.float64 in (x.dtype, weight.dtype, A.dtype, B.dtype):
                return None
            dtype = torch.get_autocast_dtype(device)
            return (x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), A.to(dtype),
                    B.to(dtype))
        return (x, weight, bias, A, B) if x.dtype == weight.dtype == A.dtype == B.dtype else None

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The plain layer with the adapter in its weight: the base itself, changed in place, or a dense copy
        of a quantized base (a layer merged in place already is its base)."""
        return self.base_layer if self.merged else fold(self.base_layer, self.merged_weight())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight`` in place; ``unmerge`` undoes it."""
        if self.merged:
            return
        if isinstance(self.base_layer, NF4Linear):
            raise UserError("a quantized layer cannot hold merged weights", fix="use lora.merge(model, cfg), which "
                            "replaces it by a dense layer")
        self._norm = row_norm(self.base_weight().float() + self.delta().float())  # kept for unmerge: W' has row norms m
        write_weight(self.base_layer, self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_weight().float()
        if self.lora_magnitude_vector is not None:
            w = w * (self._norm / self.lora_magnitude_vector)[:, None]
        write_weight(self.base_layer, w - self.delta().float())
        self.merged = False


def row_norm(weight: Tensor) -> Tensor:  # (out, in) -> (out,)
    return torch.linalg.norm(weight, dim=1)


def find(model: nn.Module, cfg: Config, params: list[tuple[str, str]] = ()) -> tuple[list[str], list[str]]:
    """The layers to wrap and the whole modules to save (none around the modules of ``params``); a UserError,
    with nothing changed, if either is wrong. A rank above a layer's width warns: the update B A of such a
    layer can already be any matrix."""
    names = family_of(model).lora if cfg.target_modules is None else cfg.target_modules  # []: the experts alone
    wrapped, saved = find_targets(model, names, cfg.modules_to_save, "LoRA", beside=tuple(path for path, _ in params))
    widths = {path: min(in_out(model.get_submodule(path))) for path in wrapped}
    if narrow := sorted((w, path) for path, w in widths.items() if w < cfg.r):
        warnings.warn(f"r={cfg.r} is above the width of {len(narrow)} targeted layer(s) (the narrowest, "
                      f"{narrow[0][1]}, has {narrow[0][0]}): their extra rank adds parameters and nothing else; "
                      f"set method.r to at most {narrow[0][0]}", TuneforgeWarning, stacklevel=3)
    return wrapped, saved


def attach(model: nn.Module, cfg: Config, wrapped: list[str], saved: list[str],
           params: list[tuple[str, str]] = ()) -> None:
    """Freeze the model, wrap each layer of ``wrapped`` and each module holding one of ``params``, and
    unfreeze the ``saved`` modules (QLoRA calls this after quantizing the same layers)."""
    wrap(model, wrapped, lambda _, base: LoRALinear(base, cfg), saved)
    for path, name in params:  # a module's second parameter wraps the first one's wrapper, as PEFT nests them
        targets.swap(model, path, lambda old: LoRAExperts(old, name, cfg, scale(cfg)))


def inject(model: nn.Module, cfg: Config) -> Injected:
    base = before_inject(model)
    params = find_parameters(model, cfg)
    attach(model, cfg, *find(model, cfg, params), params)
    return injected(__name__, cfg, base)


def layers(model: nn.Module) -> dict[str, LoRALinear]:
    return modules_of(model, LoRALinear)


FIX = "check that the adapter's config (r, target_modules, target_parameters, use_dora) matches its weights"
# The layers' A, B (and DoRA's magnitudes), then the experts', then modules_to_save; the file holds them, PEFT's keys
trainable, state_dict, load_state_dict = wrapper_hooks((LoRALinear, LoRAExperts), FIX)
for_loading = same_config


@torch.no_grad()
def merge(model: nn.Module, cfg: Config | None = None) -> None:
    """Fold every adapter into its base and put the plain layer back: a plain transformers model again.
    A quantized base becomes a dense layer holding the dequantized weight plus the update; an experts' parameter
    takes its per-expert updates and the model's own experts module goes back in place of the wrappers."""
    merge_wrapped(model, LoRALinear)
    nested = expert_layers(model)
    outermost = {path: wrapper for path, wrapper in nested.items()
                 if not isinstance(model.get_submodule(path.rpartition(".")[0]), LoRAExperts)}
    for wrapper in nested.values():
        wrapper.merge()
    for path, wrapper in outermost.items():
        targets.swap(model, path, lambda _: wrapper.experts())


def lora_form(model: nn.Module, cfg: Config) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Each wrapped layer's (A (r, in), B (out, r), s), its update exactly s * B @ A: what a LoRA file in
    another runtime's format holds. DoRA, whole saved modules and the experts' updates have no such form."""
    if cfg.use_dora:
        raise UserError("DoRA rescales each output row by a learned magnitude, so its update is no low-rank B A")
    if experts := next(iter(expert_layers(model)), None):
        raise UserError(f"the adapter on the experts' parameters ({experts}) has one update per expert, which a "
                        "LoRA file of another runtime cannot hold", fix="merge it into the model and export that, "
                        "or train without target_parameters")
    if saved := saved_paths(model, cfg):
        raise UserError(f"the adapter holds whole modules beside its low-rank updates ({saved[0]})")
    return {path: (layer.lora_A.weight, layer.lora_B.weight, layer.scale) for path, layer in layers(model).items()}


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter off (base outputs) or on again."""
    for layer in [*layers(model).values(), *expert_layers(model).values()]:
        if layer.merged:
            raise UserError("cannot switch off an adapter that is merged into its base", fix="unmerge it first")
        layer.enabled = enabled


def combine(state_dicts: list[dict[str, Tensor]], weights: list[float], cfg: Config) -> tuple[Config, dict]:
    """One adapter whose update is exactly sum_i w_i * s * B_i A_i: the A's stacked, the weighted B's side
    by side. The rank becomes the sum of the ranks; lora_alpha follows so that the scale s is unchanged."""
    if cfg.use_dora:
        raise UserError("DoRA adapters do not combine linearly (the magnitude rescales each row)")
    if cfg.target_parameters:
        raise UserError("adapters on the experts' parameters do not combine by stacking (each expert's rank is "
                        "interleaved in B)", fix="combine adapters made without target_parameters")
    if len(state_dicts) != len(weights) or not state_dicts:
        raise UserError(f"{len(state_dicts)} adapters but {len(weights)} weights")
    keys = state_dicts[0].keys()
    if any(sd.keys() != keys for sd in state_dicts):
        raise UserError("the adapters target different modules", fix="combine adapters made with the same targets")
    out = {}
    for key in keys:
        parts = [sd[key] for sd in state_dicts]
        if any(p.shape != parts[0].shape for p in parts):
            raise UserError(f"the adapters differ in shape at {key!r}", fix="combine adapters of equal rank")
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat(parts, dim=0)  # k x (r, in) -> (k*r, in)
        elif key.endswith(".lora_B.weight"):
            out[key] = torch.cat([w * p for w, p in zip(weights, parts)], dim=1)  # k x (out, r) -> (out, k*r)
        else:
            raise UserError(f"{key!r} is a whole saved module, not a low-rank update; it cannot be combined")
    r = cfg.r * len(state_dicts)
    return replace(cfg, r=r, lora_alpha=scale(cfg) * (math.sqrt(r) if cfg.use_rslora else r)), out


def file_config(model: nn.Module, cfg: Config) -> dict:
    """PEFT's LoraConfig keys."""
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    return {**peft_keys(PEFT_TYPE, model, LoRALinear, cfg), "r": cfg.r, "lora_alpha": alpha,
            "lora_dropout": cfg.lora_dropout,
            "target_parameters": list(cfg.target_parameters) if cfg.target_parameters else None,
            "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "bias": "none",
            "init_lora_weights": cfg.init_lora_weights}
