"""LoRA: a frozen linear layer plus a trainable low-rank update, y = W0 x + s * B A x.

A (r x in) starts random and B (out x r) at zero, so training starts from the base model. The
scale s is alpha / r, or alpha / sqrt(r) with rsLoRA (a rank-independent learning dynamic). DoRA
(Liu et al. 2024) splits each output row into a direction, W0 + s B A normalised, and a learned
magnitude m: y = m / ||W0 + s B A|| * (W0 x + s B A x) + b, the norm held constant in backward.
Keys and math follow PEFT, so the adapters it writes load there and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuneforge import targets
from tuneforge.errors import UserError
from tuneforge.methods import load_prefixed, mark_injected, prefixed_state
from tuneforge.quant.nf4 import NF4Linear

PEFT_TYPE = "LORA"
WRAPPABLE = (nn.Linear, NF4Linear)  # layer types LoRA attaches to (QLoRA: quantize first, then this)
REGEX_CHARS = set("*+?()[]{}|\\^$")


@dataclass(frozen=True)
class Config:
    r: int = 8  # rank of the update
    lora_alpha: float = 16  # the update is scaled by lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter's input
    # leaf names (["q_proj", "v_proj"]), a regular expression over module paths, or "all-linear"
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False  # scale by lora_alpha / sqrt(r): higher ranks keep learning
    use_dora: bool = False  # learn a magnitude per output row as well (DoRA)
    modules_to_save: list[str] | None = None  # whole modules trained and saved besides the adapter (e.g. lm_head)
    bias: str = "none"  # PEFT's bias training; only "none" is supported
    init_lora_weights: bool | str = True  # True: B = 0 (identity at start); "gaussian"; False: B random too

    def __post_init__(self):
        # The config parser reads a lone string as a one-item list; a regex or "all-linear" is a string.
        t = self.target_modules
        if isinstance(t, list) and len(t) == 1 and (t[0] == "all-linear" or REGEX_CHARS & set(t[0])):
            object.__setattr__(self, "target_modules", t[0])
        if self.r < 1:
            raise UserError(f"r must be at least 1, got {self.r}", "method.r")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}", "method.lora_dropout")
        if self.bias != "none":
            raise UserError(f"bias={self.bias!r} is not supported", "method.bias", fix='use bias: "none"')
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise UserError(f"init_lora_weights={self.init_lora_weights!r} is not supported",
                            "method.init_lora_weights", fix='use true, false or "gaussian"')


def scale(cfg: Config) -> float:
    return cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)


class LoRALinear(nn.Module):
    """``base_layer`` (an nn.Linear, or any layer with in/out_features and a weight or ``dequantize()``)
    plus ``lora_A``, ``lora_B`` and, with DoRA, ``lora_magnitude_vector``."""

    def __init__(self, base_layer: nn.Module, cfg: Config):
        super().__init__()
        self.base_layer, self.scale = base_layer, scale(cfg)
        device = next(iter([*base_layer.parameters(), *base_layer.buffers()])).device
        self.dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, cfg.r, bias=False, device=device)  # kaiming_uniform(a=sqrt(5))
        self.lora_B = nn.Linear(cfg.r, base_layer.out_features, bias=False, device=device)
        if cfg.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / cfg.r)
        if cfg.init_lora_weights:  # False keeps nn.Linear's random B, as PEFT does
            nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = None
        if cfg.use_dora:  # ||W0 + s B A|| per row: the identity at the start
            with torch.no_grad():
                self.lora_magnitude_vector = nn.Parameter(row_norm(self.base_weight().float() + self.delta()))
        self.merged, self.enabled = False, True

    def base_weight(self) -> Tensor:  # (out, in), dequantized when the base is quantized
        dequantize = getattr(self.base_layer, "dequantize", None)
        return dequantize() if callable(dequantize) else self.base_layer.weight

    def delta(self) -> Tensor:  # (out, in) = s * (out, r) @ (r, in)
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def merged_weight(self) -> Tensor:  # (out, in), float32: the one matrix equal to base + adapter
        weight = self.base_weight().float() + self.delta().float()
        if self.lora_magnitude_vector is not None:
            weight = (self.lora_magnitude_vector / row_norm(weight))[:, None] * weight
        return weight

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        result = self.base_layer(x)
        if self.merged or not self.enabled:
            return result
        xd = self.dropout(x).to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(xd)) * self.scale
        if self.lora_magnitude_vector is None:
            return (result + lora).to(result.dtype)
        weight = self.base_weight().to(xd.dtype)
        norm = row_norm(weight + self.delta().detach()).detach()  # DoRA 4.3: a constant in backward
        g = self.lora_magnitude_vector / norm  # (out,)
        if self.training and not isinstance(self.dropout, nn.Identity):
            base = F.linear(xd, weight)  # W0 on the dropped-out input, as PEFT
        else:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        return (result + (g - 1) * base + g * lora).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight`` in place; ``unmerge`` undoes it."""
        if self.merged:
            return
        if callable(getattr(self.base_layer, "dequantize", None)):
            raise UserError("a quantized layer cannot hold merged weights", fix="use lora.merge(model), which "
                            "replaces it by a dense layer")
        weight = self.base_layer.weight
        self._norm = row_norm(weight.float() + self.delta().float())  # kept for unmerge: W' has row norms m
        weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        w = weight.float()
        if self.lora_magnitude_vector is not None:
            w = w * (self._norm / self.lora_magnitude_vector)[:, None]
        weight.copy_(w - self.delta().float())
        self.merged = False


def row_norm(weight: Tensor) -> Tensor:  # (out, in) -> (out,)
    return torch.linalg.norm(weight, dim=1)


def _saved(model: nn.Module, cfg: Config) -> list[str]:
    names = getattr(cfg, "modules_to_save", None)
    return targets.find(model, names, types=(nn.Module,), key="modules_to_save") if names else []


def _find(model: nn.Module, cfg: Config) -> tuple[list[str], list[str]]:
    wrapped, saved = targets.find(model, cfg.target_modules, types=WRAPPABLE), _saved(model, cfg)
    for s in saved:
        clash = [w for w in wrapped if w == s or w.startswith(s + ".") or s.startswith(w + ".")]
        if clash:
            raise UserError(f"modules_to_save entry {s!r} overlaps the LoRA targets {clash[:3]}", "modules_to_save",
                            fix="save a module that no target lies in, or drop it from target_modules")
    return wrapped, saved


def inject(model: nn.Module, cfg: Config, name: str = "lora") -> None:
    """Freeze the model and wrap each target; QLoRA calls this with name="qlora" after quantizing."""
    mark_injected(model, name, cfg)  # raises if any method is already in
    try:
        wrapped, saved = _find(model, cfg)
    except UserError:
        model.tuneforge_method = None  # nothing changed: the user can fix the names and retry
        raise
    model.requires_grad_(False)
    for path in wrapped:
        targets.swap(model, path, lambda base: LoRALinear(base, cfg))
    for path in saved:
        model.get_submodule(path).requires_grad_(True)


def layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {}
    for path, layer in layers(model).items():
        for key, p in (("lora_A.weight", layer.lora_A.weight), ("lora_B.weight", layer.lora_B.weight),
                       ("lora_magnitude_vector", layer.lora_magnitude_vector)):
            if p is not None:
                params[f"{path}.{key}"] = p
    for path in _saved(model, model.tuneforge_method[1]):
        params.update({f"{path}.{key}": p for key, p in model.get_submodule(path).named_parameters()})
    return params


def state_dict(model: nn.Module) -> dict[str, Tensor]:
    return prefixed_state(trainable(model))


def load_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    load_prefixed(trainable(model), sd,
                  fix="check that the adapter's config "
                      "(r, target_modules, use_dora) matches its weights")


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every adapter into its base and put the plain layer back: a plain transformers model again."""
    for path, layer in layers(model).items():
        if callable(getattr(layer.base_layer, "dequantize", None)):  # a quantized base becomes a dense one
            base = layer.base_layer
            plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                              device=layer.lora_A.weight.device, dtype=layer.base_weight().dtype)
            plain.weight.copy_(layer.merged_weight())
            if base.bias is not None:
                plain.bias.copy_(base.bias)
            plain.requires_grad_(False)
        else:
            layer.merge()
            plain = layer.base_layer
        targets.swap(model, path, lambda _: plain)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter off (base outputs) or on again."""
    for layer in layers(model).values():
        if layer.merged:
            raise UserError("cannot switch off an adapter that is merged into its base", fix="unmerge it first")
        layer.enabled = enabled


def combine(state_dicts: list[dict[str, Tensor]], weights: list[float], cfg: Config) -> tuple[Config, dict]:
    """One adapter whose update is exactly sum_i w_i * s * B_i A_i: the A's stacked, the weighted B's side
    by side. The rank becomes the sum of the ranks; lora_alpha follows so that the scale s is unchanged."""
    if cfg.use_dora:
        raise UserError("DoRA adapters do not combine linearly (the magnitude rescales each row)")
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


def peft_config(cfg: Config, model: nn.Module) -> dict:
    """PEFT's LoraConfig keys. target_modules lists the leaf names of the wrapped layers when they select
    exactly those layers, else their full paths, so PEFT wraps the same layers whatever the pattern was;
    modules_to_save lists full paths, since PEFT matches those as bare suffixes ("norm" takes "input_layernorm")."""
    wrapped = list(layers(model))
    leaves = sorted({path.rsplit(".", 1)[-1] for path in wrapped})
    exact = set(targets.find(model, leaves, types=(nn.Module,))) == set(wrapped)
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": alpha,
            "lora_dropout": cfg.lora_dropout, "target_modules": leaves if exact else wrapped,
            "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "modules_to_save": _saved(model, cfg) or None,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": cfg.init_lora_weights,
            "inference_mode": True}
