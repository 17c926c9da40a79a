"""Virtual tokens, shared by prompt and prefix tuning: both put n positions before every sequence
without forking the model, by a forward pre-hook that rewrites each call.

- ``named_inputs``: a call's arguments by name, so model(ids) and model(input_ids=ids) look alike;
- ``starts_sequence``: no KV cache yet, or ``generate``'s empty one (the virtual tokens are not in);
- ``widen``: n ones on the left of the 2-D padding mask, and given positions moved n on;
- ``attach``: the method's module on the model (so it moves, trains and is found with it) and its hooks;
- ``text_ids``: the tokens of an initialization text, repeated or cut to n, as PEFT does.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn
from transformers import AutoTokenizer

from tuneforge.core.errors import UserError

CACHE_ARGS = ("cache", "past_key_values")  # transformers 5's name for the KV cache, and the older one
MODEL_KEYS = ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")


def named_inputs(arg_names: list[str], args: tuple, kwargs: dict) -> dict:
    return {**dict(zip(arg_names, args)), **kwargs}


def cache_in(kwargs: dict):
    return next((kwargs[k] for k in CACHE_ARGS if kwargs.get(k) is not None), None)


def cache_arg(kwargs: dict, arg_names: list[str]) -> str:
    """The keyword this call passes its cache under, else the one the model's forward takes."""
    return next((k for k in CACHE_ARGS if kwargs.get(k) is not None),
                next((k for k in CACHE_ARGS if k in arg_names), CACHE_ARGS[0]))


def starts_sequence(kwargs: dict) -> bool:
    cache = cache_in(kwargs)
    return cache is None or cache.get_seq_length() == 0


def widen(kwargs: dict, n: int, lead_positions: bool) -> None:
    """n ones on the left of the padding mask; given positions move n on (the virtual tokens hold
    0..n-1, and with ``lead_positions`` those are prepended, for inputs that include them)."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise UserError(f"a {mask.dim()}-D attention mask cannot be widened for virtual tokens",
                            fix="pass the 2-D (batch, seq) padding mask")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    positions = kwargs.get("position_ids")
    if positions is not None:
        positions = positions + n
        if lead_positions:
            lead = torch.arange(n, dtype=positions.dtype, device=positions.device)
            positions = torch.cat([lead.expand(*positions.shape[:-1], n), positions], dim=-1)
        kwargs["position_ids"] = positions


def forward_arg_names(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def attach(model: nn.Module, name: str, module: nn.Module, before: Callable,
           after: Callable | None = None) -> None:
    """``module`` becomes the model's submodule ``name``; ``before`` (and ``after``) hook its forward."""
    model.add_module(name, module)
    model.register_forward_pre_hook(before, with_kwargs=True)
    if after is not None:
        model.register_forward_hook(after, with_kwargs=True)


def find(model: nn.Module, kind: type) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, kind))


def check_model_keys(cfg, actual: dict) -> None:
    """An adapter's recorded model shape must be this model's."""
    for key in MODEL_KEYS:
        given = getattr(cfg, key)
        if given is not None and given != actual[key]:
            raise UserError(f"the adapter was made for {key}={given}, but this model has {actual[key]}",
                            f"method.{key}", fix="load the base the adapter was made for, or drop the key")


def text_tokenizer(model: nn.Module, name: str | None, tokenizer, what: str):
    """The tokenizer that splits an initialization text (``what`` names it in errors), and the name
    to record for it: ``tokenizer`` if given, else the one in folder ``name``, else the model's own."""
    if tokenizer is not None:
        return tokenizer, name or getattr(tokenizer, "name_or_path", None) or None
    source = name or getattr(model.config, "name_or_path", None)
    if not source:
        raise UserError(f"{what} needs a tokenizer to split the text", "method.tokenizer_name_or_path",
                        fix="set tokenizer_name_or_path to the model's folder or hub name (or pass tokenizer=)")
    try:
        return AutoTokenizer.from_pretrained(source), source
    except Exception as exc:  # a missing folder, no network, not a tokenizer: transformers' own error types
        raise UserError(f"cannot load a tokenizer from {source!r} ({exc})", "method.tokenizer_name_or_path",
                        fix="set tokenizer_name_or_path to a folder that holds the model's tokenizer") from None


def text_ids(tokenizer, text: str, n: int, key: str) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise UserError("the initialization text has no tokens", key)
    return (ids * math.ceil(n / len(ids)))[:n]


def no_merge(what: str) -> None:
    raise UserError(f"{what}, not a change of weights: it cannot be merged into the model",
                    fix="keep the adapter and load it with the base (tuneforge eval/generate --adapter)")
