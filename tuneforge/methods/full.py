"""Full-parameter fine-tuning: every weight trains, optionally all but the embeddings or the
first k transformer blocks (freezing the bottom of the network saves optimizer memory and keeps
the most general features). The result is a whole model, not an adapter: a run saves it as a
Hugging Face directory (``WHOLE_MODEL``)."""

from __future__ import annotations

from torch import Tensor, nn

from tuneforge.model import targets
from tuneforge.core.errors import UserError
from tuneforge.methods._shared import Injected, MethodModule, before_inject, injected, load_exact, no_lora_form
from tuneforge.core.config.methods import FullConfig as Config

NAME, KIND, PEFT_TYPE, WHOLE_MODEL, MERGES = "full", "gradient", None, True, True
ADDS = None  # its change is a change of weights


class Trained(nn.Module, MethodModule):
    """No tensors: it marks the model as one whose every weight full fine-tuning trains, so that a
    second inject is refused like any other method's."""


def inject(model: nn.Module, cfg: Config) -> Injected:
    """Unfreeze the model, then freeze what ``cfg`` keeps. Inject into a fresh model: one that
    holds another method (or a quantized layer, whose 4-bit codes cannot train) is refused."""
    base = before_inject(model, quantized_too=True)
    stack = targets.blocks(model) if cfg.freeze_layers else []
    if cfg.freeze_layers > len(stack):
        raise UserError(f"freeze_layers={cfg.freeze_layers} but the model has {len(stack)} blocks",
                        "method.freeze_layers")
    model.requires_grad_(True)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    for block in stack[: cfg.freeze_layers]:
        block.requires_grad_(False)
    model.add_module("tuneforge_full", Trained())
    return injected(__name__, cfg, base)


def trainable(model: nn.Module, cfg: Config) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def state_dict(model: nn.Module, cfg: Config) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in trainable(model, cfg).items()}


def load_state_dict(model: nn.Module, cfg: Config, sd: dict[str, Tensor]) -> None:
    load_exact(trainable(model, cfg), sd, fix="load weights saved from the same model with the same freeze settings")


def for_loading(cfg: Config) -> Config:
    return cfg


def merge(model: nn.Module, cfg: Config | None = None) -> None:
    """Nothing to fold: the base weights are the trained weights."""


def file_config(model: nn.Module, cfg: Config) -> dict:
    raise UserError("full fine-tuning changes the model itself, so its result is a whole model, not an adapter",
                    fix="save it with tuneforge.save_model(model, tokenizer, folder), as `tuneforge train` does")


def lora_form(model: nn.Module, cfg: Config | None = None) -> dict:
    no_lora_form("full fine-tuning changes every weight itself")
