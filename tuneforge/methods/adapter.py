"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): inside every transformer block a
small residual module h + up(act(down(h))) is applied to the output of a sublayer.

    houlsby   after the attention output projection and after the MLP output projection
    pfeiffer  after the MLP output projection only (half the parameters, about the same quality)

The wrapped sublayers are found per block (``targets.blocks``) by name through ``targets.find``:
``attn_output_modules`` and ``mlp_output_modules`` (by default the family's, ``o_proj`` and
``down_proj`` on llama, the whole MoE block on a Mixture-of-Experts model); each block must hold
exactly one of each, and its output is the width of the residual stream. ``up`` starts at zero, so training starts from the base model.
PEFT has no such method: the adapter is saved in tuneforge's format (``"peft_type": null``), keys

    base_model.model.<wrapped module path>.adapter.down.weight / .down.bias / .up.weight / .up.bias
    base_model.model.<norm path>.weight (and .bias)            with train_norms
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from tuneforge.model import targets
from tuneforge.model.families import family_of
from tuneforge.core.errors import UserError
from tuneforge.methods._shared import (Injected, MethodModule, before_inject, device_of, injected, method_parameters,
                                       modules_of, no_lora_form, prefixed_hooks, same_config, wrap)
from tuneforge.core.config.methods import AdapterConfig as Config

NAME, KIND, PEFT_TYPE, WHOLE_MODEL, MERGES = "adapter", "gradient", None, False, False
ADDS = "adds layers of its own (with a nonlinearity) to the model"  # instead of changing its weights
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """up(dropout(act(down(h)))): hidden -> bottleneck -> hidden, zero at the start."""

    def __init__(self, hidden: int, bottleneck: int, cfg: Config, device: torch.device):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, device=device)
        self.act = ACTIVATIONS[cfg.non_linearity]()
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.up = nn.Linear(bottleneck, hidden, device=device)
        nn.init.zeros_(self.up.weight)  # the adapter adds exactly nothing until it trains
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:  # (..., hidden) -> (..., hidden)
        return self.up(self.dropout(self.act(self.down(h))))


class AdaptedOutput(nn.Module, MethodModule):
    """``base_layer`` followed by a residual bottleneck on its output: y = f(x) + adapter(f(x))."""

    def __init__(self, base_layer: nn.Module, width: int, bottleneck: int, cfg: Config):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = Bottleneck(width, bottleneck, cfg, device_of(base_layer))

    def forward(self, *args, **kwargs) -> Tensor:
        out = self.base_layer(*args, **kwargs)
        if not self.enabled:
            return out
        h = out[0] if isinstance(out, tuple) else out  # an MoE block may return its router's scores too
        h = h + self.adapter(h.to(self.adapter.down.weight.dtype)).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def is_norm(module: nn.Module) -> bool:
    """A normalization layer, known by its structure rather than its class name: a leaf whose parameters
    are a 1-D weight (and bias) and which keeps an epsilon (LayerNorm's and Gemma's ``eps``, Llama's
    RMSNorm's ``variance_epsilon``)."""
    params = dict(module.named_parameters(recurse=False))
    return (next(module.children(), None) is None and "weight" in params and params["weight"].dim() == 1
            and set(params) <= {"weight", "bias"} and any(hasattr(module, k) for k in ("eps", "variance_epsilon")))


def _per_block(model: nn.Module, names: list[str], key: str) -> list[str]:
    """The one module in each block whose leaf name is in ``names``; a block with none or several is an error."""
    stack = targets.blocks(model)
    block_path = {id(m): path for path, m in model.named_modules()}
    hits = targets.find(model, names, types=(nn.Module,), key=f"method.{key}")
    found = []
    for i, block in enumerate(stack):
        prefix = block_path[id(block)] + "."
        inside = [h for h in hits if h.startswith(prefix)]
        if len(inside) != 1:
            raise UserError(f"block {i} ({prefix[:-1]}) has {len(inside)} modules named {names}, expected one",
                            f"method.{key}", fix="give the leaf name of the one output projection in each block")
        found += inside
    return found


def inject(model: nn.Module, cfg: Config) -> Injected:
    base = before_inject(model)
    family = family_of(model)
    wrapped = _per_block(model, cfg.mlp_output_modules or family.mlp_output, "mlp_output_modules")
    if cfg.placement == "houlsby":
        wrapped = _per_block(model, cfg.attn_output_modules or family.attn_output, "attn_output_modules") + wrapped
    width = model.config.get_text_config().hidden_size  # what a sublayer adds to the residual stream
    wrap(model, wrapped, lambda _, base: AdaptedOutput(
        base, width, cfg.bottleneck_size or max(1, width // cfg.reduction_factor), cfg))
    if cfg.train_norms:
        for module in model.modules():
            if is_norm(module):
                module.requires_grad_(True)
    return injected(__name__, cfg, base)


def layers(model: nn.Module) -> dict[str, AdaptedOutput]:
    return modules_of(model, AdaptedOutput)


def trainable(model: nn.Module, cfg: Config) -> dict[str, nn.Parameter]:
    """Each bottleneck's down and up projections, then with train_norms every norm's weight (and bias)."""
    params = method_parameters(model, (AdaptedOutput,))
    if cfg.train_norms:
        for path, module in model.named_modules():
            if is_norm(module):
                params.update({f"{path}.{key}": p for key, p in module.named_parameters(recurse=False)})
    return params


# The file holds the trainable tensors under PEFT-style keys.
state_dict, load_state_dict = prefixed_hooks(
    trainable, fix="check that the adapter's config (placement, bottleneck_size, train_norms, module names) matches "
                   "its weights")
for_loading = same_config


def merge(model: nn.Module, cfg: Config | None = None) -> None:
    raise UserError("bottleneck adapters put a nonlinearity between their two projections, so they cannot be "
                    "folded into the base weights", "method adapter",
                    fix="keep the model unmerged and load the adapter on top of the base (load_adapter), "
                        "or train with lora or ia3 if you need a merged model")


def file_config(model: nn.Module, cfg: Config) -> dict:
    """No PEFT type: the config is tuneforge's own, and the method name tells the loader what to inject."""
    return {"peft_type": None, "method": NAME, **dataclasses.asdict(cfg)}


def lora_form(model: nn.Module, cfg: Config | None = None) -> dict:
    no_lora_form("a bottleneck adapter adds a small MLP with a nonlinearity")
