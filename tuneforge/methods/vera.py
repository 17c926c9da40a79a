"""VeRA (Kopiczko et al. 2024): LoRA's low-rank update with both matrices frozen, random and shared by
every adapted layer; each layer learns only two vectors that scale them:

    y = W0 x + lambda_b * B (lambda_d * A drop(x))       delta W = diag(lambda_b) B diag(lambda_d) A

A (r x max_in) and B (max_out x r) are drawn once from ``projection_prng_key``, as wide as the widest
targeted layer's input and output; each layer reads the corner it needs, A[:, :in] and B[:out, :].
lambda_d (r,) starts at d_initial and lambda_b (out,) at zero, so training starts from the base model.
A layer trains r + out numbers where LoRA trains r * (in + out). The update is a low-rank B' A', so it
merges and exports as a LoRA file. Keys, the draw and the math follow PEFT's VeRA, so adapters load
there and back:

    base_model.model.<module path>.vera_lambda_b   (out,)
    base_model.model.<module path>.vera_lambda_d   (r,)
    base_model.vera_A (r, max_in), base_model.vera_B (max_out, r)     with save_projection (the default)

Without save_projection the file holds the vectors alone and loading draws the pair again from the key
(PyTorch's CPU generator, on any machine).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuneforge.core.config.methods import VeraConfig as Config
from tuneforge.core.errors import UserError
from tuneforge.methods._shared import (PEFT_PREFIX, Injected, MethodModule, base_weight, before_inject, device_of,
                                       file_hooks, find_targets, fold, in_out, injected, merge_wrapped, modules_of,
                                       peft_keys, same_config, saved_paths, wrap, wrapper_hooks)
from tuneforge.model.families import family_of

NAME, KIND, PEFT_TYPE, WHOLE_MODEL, MERGES = "vera", "gradient", "VERA", False, True
ADDS = None  # its change is a change of weights
PROJECTIONS = "base_model."  # the shared pair's keys on disk are PEFT's: beside the model, not under it
FIX = "check that the adapter's config (r, target_modules, save_projection) matches its weights"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in): PEFT's draw, step for step, so a key gives the same bits."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections(nn.Module):
    """The frozen random pair every VeRA layer of a model shares (one module, a child of each layer)."""

    def __init__(self, r: int, n_in: int, n_out: int, key: int, device: torch.device):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(key)
        self.register_buffer("vera_A", kaiming_uniform((r, n_in), generator).to(device))  # drawn first, as PEFT
        self.register_buffer("vera_B", kaiming_uniform((n_out, r), generator).to(device))


class VeraLinear(nn.Module, MethodModule):
    """``base_layer`` plus the shared ``projections`` scaled by this layer's ``vera_lambda_b`` and
    ``vera_lambda_d``, the two tensors it trains."""

    def __init__(self, base_layer: nn.Module, projections: Projections, cfg: Config):
        super().__init__()
        self.base_layer, self.projections = base_layer, projections
        self.n_in, self.n_out = in_out(base_layer)
        device = device_of(base_layer)
        if cfg.init_weights:
            b, d = torch.zeros(self.n_out, device=device), torch.full((cfg.r,), cfg.d_initial, device=device)
        else:  # PEFT's untouched start: the update is random from the first step
            b, d = torch.ones(self.n_out, device=device), torch.randn(cfg.r, device=device)
        self.vera_lambda_b, self.vera_lambda_d = nn.Parameter(b), nn.Parameter(d)
        self.dropout = nn.Dropout(cfg.vera_dropout) if cfg.vera_dropout else nn.Identity()

    def corner(self) -> tuple[Tensor, Tensor]:
        """A[:, :in] (r, in) and B[:out, :] (out, r): the part of the shared pair this layer reads."""
        d = self.vera_lambda_d
        a, b = self.projections.vera_A[:, :self.n_in], self.projections.vera_B[:self.n_out]
        return a.to(device=d.device, dtype=d.dtype), b.to(device=d.device, dtype=d.dtype)

    def low_rank(self) -> tuple[Tensor, Tensor]:
        """(A' (r, in), B' (out, r)) = (diag(lambda_d) A, diag(lambda_b) B): the update is exactly B' A'."""
        a, b = self.corner()
        return self.vera_lambda_d[:, None] * a, self.vera_lambda_b[:, None] * b

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        result = self.base_layer(x)
        if not self.enabled:
            return result
        a, b = self.corner()
        xd = self.dropout(x.to(self.vera_lambda_d.dtype))
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(xd, a), b)  # (..., r) -> (..., out)
        return (result + update).to(result.dtype)

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The plain layer with the update in its weight (a dense copy of a quantized base)."""
        a, b = self.low_rank()
        return fold(self.base_layer, base_weight(self.base_layer).float() + (b @ a).float())


def inject(model: nn.Module, cfg: Config) -> Injected:
    """Freeze the model, draw the shared pair at the targets' largest widths, and wrap each target."""
    base = before_inject(model)
    family = family_of(model)
    names = (family.vera or family.lora) if cfg.target_modules is None else cfg.target_modules
    wrapped, saved = find_targets(model, names, cfg.modules_to_save, "VeRA")
    widths = [in_out(model.get_submodule(path)) for path in wrapped]
    device = device_of(model.get_submodule(wrapped[0]))
    pair = Projections(cfg.r, max(w[0] for w in widths), max(w[1] for w in widths), cfg.projection_prng_key, device)
    wrap(model, wrapped, lambda _, layer: VeraLinear(layer, pair, cfg), saved)
    return injected(__name__, cfg, base)


def layers(model: nn.Module) -> dict[str, VeraLinear]:
    return modules_of(model, VeraLinear)


trainable = wrapper_hooks((VeraLinear,), FIX)[0]  # each layer's lambda_b and lambda_d, then modules_to_save


def tensors(model: nn.Module, cfg: Config) -> dict[str, Tensor]:
    """What the file holds, by PEFT's keys: the trainable tensors, and the shared pair with save_projection."""
    held = {PEFT_PREFIX + key: p for key, p in trainable(model, cfg).items()}
    if cfg.save_projection:
        pair = next(iter(layers(model).values())).projections
        held.update({PROJECTIONS + key: t for key, t in pair.named_buffers()})
    return held


state_dict, load_state_dict = file_hooks(tensors, FIX)
for_loading = same_config


def merge(model: nn.Module, cfg: Config | None = None) -> None:
    """Fold every update into its layer's weights and put the plain layer back."""
    merge_wrapped(model, VeraLinear)


@torch.no_grad()
def lora_form(model: nn.Module, cfg: Config) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Each layer's (A' (r, in), B' (out, r), 1): VeRA's update is LoRA's form with the vectors folded in."""
    if saved := saved_paths(model, cfg):
        raise UserError(f"the adapter holds whole modules beside its low-rank updates ({saved[0]})")
    return {path: (*layer.low_rank(), 1.0) for path, layer in layers(model).items()}


def file_config(model: nn.Module, cfg: Config) -> dict:
    """PEFT's VeraConfig keys."""
    return {**peft_keys(PEFT_TYPE, model, VeraLinear, cfg), "r": cfg.r, "projection_prng_key": cfg.projection_prng_key,
            "save_projection": cfg.save_projection, "vera_dropout": cfg.vera_dropout, "d_initial": cfg.d_initial,
            "bias": "none", "init_weights": cfg.init_weights, "layers_to_transform": None, "layers_pattern": None}
