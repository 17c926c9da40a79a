"""Full-parameter fine-tuning: every weight trains, optionally all but the embeddings or the
first k transformer blocks (freezing the bottom of the network saves optimizer memory and keeps
the most general features)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tuneforge import targets
from tuneforge.errors import UserError
from tuneforge.methods import mark_injected

PEFT_TYPE = None


@dataclass(frozen=True)
class Config:
    freeze_embeddings: bool = False  # keep the input embeddings (and a head tied to them) frozen
    freeze_layers: int = 0  # keep the first k transformer blocks frozen


def inject(model: nn.Module, cfg: Config) -> None:
    mark_injected(model, "full", cfg)
    model.requires_grad_(True)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    if cfg.freeze_layers:
        stack = targets.blocks(model)
        if cfg.freeze_layers > len(stack):
            raise UserError(f"freeze_layers={cfg.freeze_layers} but the model has {len(stack)} blocks",
                            "method.freeze_layers")
        for block in stack[: cfg.freeze_layers]:
            block.requires_grad_(False)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in trainable(model).items()}


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    params = trainable(model)
    missing, unexpected = params.keys() - sd.keys(), sd.keys() - params.keys()
    if missing or unexpected:
        raise UserError(f"state dict does not fit: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != sd[name].shape:
                raise UserError(f"shape mismatch for {name}: {tuple(sd[name].shape)} vs {tuple(p.shape)}")
            p.copy_(sd[name])


def merge(model: nn.Module) -> None:
    """Nothing to fold: the base weights are the trained weights."""


def save(model: nn.Module, tokenizer, out_dir) -> None:
    """The result of full fine-tuning is a whole model: a Hugging Face directory (safetensors,
    config, tokenizer) that transformers and ``tuneforge generate --model DIR`` load."""
    from tuneforge.io.atomic import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
