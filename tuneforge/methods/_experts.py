"""LoRA on the experts of a Mixture-of-Experts block, which are 3-D parameters (E, out, in), or
(E, in, out) where the module says ``is_transposed`` (gpt_oss), not linear layers. ``target_parameters``
gives each expert e its own update s * B_e A_e, added to the weight for the forward only, without
forking the model: PEFT's ParamWrapper, its keys and math, so the adapters load there and back.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tuneforge.core.errors import TuneforgeWarning, UserError
from tuneforge.methods._shared import MethodModule, lora_pair, modules_of
from tuneforge.model import targets


class LoRAExperts(nn.Module, MethodModule):
    """``base_layer`` (an MoE block's experts, or another LoRAExperts around them: one wrapper per targeted
    parameter, nested as PEFT nests them) plus ``lora_A`` (r*E, in) and ``lora_B`` (out, r*E) on its 3-D
    parameter ``param_name``. Expert e's update is s * B_e A_e with A_e = lora_A rows e*r..(e+1)*r (blocked)
    and B_e = lora_B columns e, e+E, ... (interleaved): PEFT's layout, so its files load here and back."""

    def __init__(self, base_layer: nn.Module, param_name: str, cfg, scale: float):
        super().__init__()
        self.base_layer, self.param_name, self.scale = base_layer, param_name, scale
        weight = self.base_weight()
        self.transposed = bool(getattr(self.experts(), "is_transposed", False))  # stored (E, in, out)
        self.n_experts, d1, d2 = weight.shape
        n_in, n_out = (d1, d2) if self.transposed else (d2, d1)
        self.lora_A, self.lora_B = lora_pair(n_in, cfg.r * self.n_experts, n_out, cfg, weight.device)
        self.merged, self.enabled = False, True

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def held(self) -> tuple[nn.Module, str]:
        """The model's own module that holds the parameter, and the parameter's path under ``base_layer``."""
        inner, path = self.base_layer, self.param_name
        while isinstance(inner, LoRAExperts):
            inner, path = inner.base_layer, "base_layer." + path
        return inner, path

    def experts(self) -> nn.Module:
        return self.held()[0]

    def base_weight(self) -> nn.Parameter:  # (E, out, in), or (E, in, out) when transposed
        return getattr(self.experts(), self.param_name)

    def delta(self) -> Tensor:  # the base weight's shape
        n_out, n_in = self.lora_B.weight.shape[0], self.lora_A.weight.shape[1]
        a = self.lora_A.weight.reshape(self.n_experts, -1, n_in)  # (E, r, in): blocked by expert
        b = self.lora_B.weight.reshape(n_out, -1, self.n_experts)  # (out, r, E): interleaved
        return self.scale * torch.einsum("ore,eri->eio" if self.transposed else "ore,eri->eoi", b, a)

    def forward(self, *args, **kwargs):
        if self.merged or not self.enabled:
            return self.base_layer(*args, **kwargs)
        experts, path = self.held()
        weight = getattr(experts, self.param_name)
        # The model's own forward, reading W + delta in place of W for this call; the wrappers inside this
        # one add their own parameters' updates the same way.
        return functional_call(self.base_layer, {path: weight + self.delta().to(weight.dtype)}, args, kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self.base_weight()
            weight += self.delta().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_weight()
            weight -= self.delta().to(weight.dtype)
            self.merged = False


def find_parameters(model: nn.Module, cfg) -> list[tuple[str, str]]:
    """The experts' parameters that target_parameters selects, as (module path, parameter name) in model order,
    a module's own in the order it registers them (the order PEFT nests its wrappers in); a UserError, with
    nothing changed, if one is not 3-D or none is selected."""
    if not cfg.target_parameters:
        return []
    wanted = list(cfg.target_parameters)
    owned = {f"{path}.{name}": (path, name, p) for path, module in model.named_modules() if path
             for name, p in module.named_parameters(recurse=False)}
    hits = [key for key in owned if any(targets.selects(key, w) for w in wanted)]
    stacked = sorted({".".join(key.split(".")[-3:]) for key, (_, _, p) in owned.items() if p.dim() == 3})
    if not hits:
        raise UserError(f"{wanted} matches no parameter of this model", "method.target_parameters",
                        fix=f"its 3-D parameters end in {', '.join(stacked)}" if stacked else
                        "this model has no experts' 3-D parameters; target_parameters is for Mixture-of-Experts models")
    if flat := [key for key in hits if owned[key][2].dim() != 3]:
        raise UserError(f"{flat[0]} has shape {tuple(owned[flat[0]][2].shape)}: target_parameters takes the experts' "
                        "3-D parameters (experts, out, in)", "method.target_parameters",
                        fix=f"select {', '.join(stacked) or 'none'}; adapt linear layers through target_modules")
    if unmatched := [w for w in wanted if not any(targets.selects(key, w) for key in hits)]:
        warnings.warn(f"target_parameters: {unmatched} match no parameter of this model; only "
                      f"{sorted({'.'.join(key.split('.')[-3:]) for key in hits})} are targeted", TuneforgeWarning,
                      stacklevel=3)
    return [owned[key][:2] for key in hits]


def expert_layers(model: nn.Module) -> dict[str, LoRAExperts]:
    """Every wrapper of an experts' parameter, outer ones before the ones they wrap."""
    return modules_of(model, LoRAExperts)
