"""Prompt tuning (Lester et al. 2021): n trainable vectors are put before the input embeddings of
every sequence, and only they train. There is no identity start: any prompt changes the outputs.

The model is not forked: a forward pre-hook on it (``with_kwargs``) rewrites each call, so the
training loop, ``eval`` and ``model.generate`` call it exactly as before.
- A call that starts a sequence (no cache, or ``generate``'s empty one) gets
  inputs_embeds = [prompt; embed(input_ids)], (batch, n + seq, hidden).
- Every call's 2-D attention mask gets n ones on the left (``generate`` keeps a mask over the real
  tokens only). Given position_ids shift by n, the prompt holding 0..n-1; without them the model
  counts 0.. over the whole sequence, as in PEFT. A decoding step with a filled cache gets only
  these two shifts: the prompt is already in the cache.
- The output head sees only the real positions (``logits_to_keep``), so logits stay
  (batch, seq, vocab) and labels align as without the method; hidden_states and attentions, when
  asked for, include the n prompt positions. (A model without ``logits_to_keep`` returns
  (batch, n + seq, vocab); ``eval.lm``'s head hook pads its mask for that.)
The file is PEFT's, {"prompt_embeddings": (n, hidden)}. Nothing merges: the prompt is input, not weight.
prefix.py reuses the call rewriting here (``named_inputs``, ``starts_sequence``, ``widen``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuneforge.errors import UserError
from tuneforge.methods import mark_injected

PEFT_TYPE = "PROMPT_TUNING"
CACHE_ARGS = ("cache", "past_key_values")  # transformers 5's name for the KV cache, and the older one
MODEL_KEYS = ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")


@dataclass(frozen=True)
class Config:
    num_virtual_tokens: int = 20  # length of the soft prompt: trainable vectors of the model's hidden size
    # RANDOM: normal, with the standard deviation of the model's embeddings; SAMPLE_VOCAB: the
    # embeddings of random tokens; TEXT: of prompt_tuning_init_text's tokens, repeated or cut to length
    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None  # TEXT: e.g. "Classify the sentiment of this review:"
    # TEXT: the tokenizer (a folder or hub name) that splits the text; default: the model's own folder
    tokenizer_name_or_path: str | None = None
    # The model's shape as PEFT records it; null: taken from the model, else checked against it
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise UserError(f"num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}",
                            "method.num_virtual_tokens")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise UserError("prompt_tuning_init TEXT needs the text", "method.prompt_tuning_init_text",
                            fix="set prompt_tuning_init_text, or use RANDOM or SAMPLE_VOCAB")


# -- the call rewriting shared with prefix tuning ------------------------------------------------

def named_inputs(arg_names: list[str], args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name: model(ids) and model(input_ids=ids) look the same to the hook."""
    return {**dict(zip(arg_names, args)), **kwargs}


def cache_in(kwargs: dict):
    return next((kwargs[k] for k in CACHE_ARGS if kwargs.get(k) is not None), None)


def starts_sequence(kwargs: dict) -> bool:
    """No cache, or an empty one (generate's prefill): the virtual tokens are not in yet."""
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


def check_model_keys(cfg, actual: dict) -> None:
    """An adapter's recorded model shape must be this model's."""
    for key in MODEL_KEYS:
        given = getattr(cfg, key)
        if given is not None and given != actual[key]:
            raise UserError(f"the adapter was made for {key}={given}, but this model has {actual[key]}",
                            f"method.{key}", fix="load the base the adapter was made for, or drop the key")


# -- prompt tuning -------------------------------------------------------------------------------

class SoftPrompt(nn.Module):
    """The n prompt vectors, kept in float32 whatever the model's dtype."""

    def __init__(self, init: Tensor, arg_names: list[str], trims_logits: bool):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(init.detach().float().clone())  # (n, hidden)
        self.arg_names, self.trims_logits = arg_names, trims_logits


def _prompt(model: nn.Module) -> SoftPrompt:
    return next(m for m in model.modules() if isinstance(m, SoftPrompt))


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    prompt = _prompt(model)
    kwargs = named_inputs(prompt.arg_names, args, kwargs)
    n, fresh = prompt.prompt_embeddings.shape[0], starts_sequence(kwargs)
    if fresh:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])  # (batch, seq, hidden)
        batch, seq = embeds.shape[:2]
        soft = prompt.prompt_embeddings.to(embeds.dtype).expand(batch, -1, -1)  # (batch, n, hidden)
        kwargs.update(input_ids=None, inputs_embeds=torch.cat([soft, embeds], dim=1))
        if prompt.trims_logits:  # the head projects the real positions only, or the last k of them
            keep = kwargs.get("logits_to_keep", 0)
            if isinstance(keep, Tensor):
                keep = F.pad(keep, (n, 0)) if keep.dtype == torch.bool else keep + n
            elif keep == 0:
                keep = torch.arange(n, n + seq, device=embeds.device)
            kwargs["logits_to_keep"] = keep
    widen(kwargs, n, lead_positions=fresh)
    return (), kwargs


def model_keys(model: nn.Module) -> dict:
    cfg = model.config.get_text_config()
    return {"token_dim": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_transformer_submodules": 1}


def text_tokenizer(model: nn.Module, name: str | None, tokenizer, what: str):
    """The tokenizer that splits an initialization text (``what`` names it in errors), and the name
    to record for it: ``tokenizer`` if given, else the one in folder ``name``, else the model's own."""
    if tokenizer is not None:
        return tokenizer, name or getattr(tokenizer, "name_or_path", None) or None
    source = name or getattr(model.config, "name_or_path", None)
    if not source:
        raise UserError(f"{what} needs a tokenizer to split the text", "method.tokenizer_name_or_path",
                        fix="set tokenizer_name_or_path to the model's folder or hub name (or pass tokenizer=)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source), source
    except Exception as exc:  # a missing folder, no network, not a tokenizer: transformers' own error types
        raise UserError(f"cannot load a tokenizer from {source!r} ({exc})", "method.tokenizer_name_or_path",
                        fix="set tokenizer_name_or_path to a folder that holds the model's tokenizer") from None


def text_ids(tokenizer, text: str, n: int, key: str) -> list[int]:
    """``text``'s tokens repeated or cut to ``n``, as PEFT does."""
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise UserError("the initialization text has no tokens", key)
    return (ids * math.ceil(n / len(ids)))[:n]


def initial_prompt(model: nn.Module, cfg: Config, tokenizer=None) -> tuple[Tensor, Config]:
    """(n, hidden) starting vectors, and the config with the tokenizer TEXT used recorded in it."""
    table = model.get_input_embeddings().weight  # (vocab, hidden)
    n = cfg.num_virtual_tokens
    if cfg.prompt_tuning_init == "RANDOM":  # at the scale of real token embeddings
        return torch.randn(n, table.shape[1], device=table.device) * table.detach().float().std(), cfg
    if cfg.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, table.shape[0], (n,)).tolist()
    else:
        tokenizer, source = text_tokenizer(model, cfg.tokenizer_name_or_path, tokenizer, "prompt_tuning_init TEXT")
        ids = text_ids(tokenizer, cfg.prompt_tuning_init_text, n, "method.prompt_tuning_init_text")
        cfg = replace(cfg, tokenizer_name_or_path=source)
    return table.detach()[torch.tensor(ids, device=table.device)].float(), cfg


def inject(model: nn.Module, cfg: Config, tokenizer=None) -> None:
    """Freeze the model and give it a soft prompt. ``tokenizer`` serves TEXT initialization; without
    it, ``tokenizer_name_or_path`` or else the folder the model was loaded from is read."""
    mark_injected(model, "prompt", cfg)  # raises if any method is already in
    try:
        check_model_keys(cfg, model_keys(model))
        init, cfg = initial_prompt(model, cfg, tokenizer)
    except UserError:
        model.tuneforge_method = None  # nothing changed: the user can fix the config and retry
        raise
    model.tuneforge_method = ("prompt", cfg)
    model.requires_grad_(False)
    params = inspect.signature(model.forward).parameters
    model.tuneforge_prompt = SoftPrompt(init, list(params), trims_logits="logits_to_keep" in params)
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)


def for_loading(cfg: Config) -> Config:
    """The config to inject before loading saved weights: no tokenizer to find for TEXT (a few
    vocabulary rows are the cheapest start to overwrite)."""
    return replace(cfg, prompt_tuning_init="SAMPLE_VOCAB")


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{path}.{key}": p for path, m in model.named_modules() if isinstance(m, SoftPrompt)
            for key, p in m.named_parameters()}


def state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {"prompt_embeddings": _prompt(model).prompt_embeddings.detach()}


@torch.no_grad()
def load_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    param = _prompt(model).prompt_embeddings
    if set(sd) != {"prompt_embeddings"}:
        raise UserError(f"a prompt-tuning adapter holds one tensor, 'prompt_embeddings'; this one has {sorted(sd)[:3]}",
                        fix="load an adapter saved with method prompt (PEFT: PROMPT_TUNING)")
    if sd["prompt_embeddings"].shape != param.shape:
        raise UserError(f"tensor 'prompt_embeddings' has shape {tuple(sd['prompt_embeddings'].shape)}, the model "
                        f"expects {tuple(param.shape)}", fix="check num_virtual_tokens and the base model")
    param.copy_(sd["prompt_embeddings"])


def merge(model: nn.Module) -> None:
    raise UserError("a soft prompt is extra input, not a change of weights: it cannot be merged into the model",
                    fix="keep the adapter and load it with the base (tuneforge eval/generate --adapter)")


def peft_config(cfg: Config, model: nn.Module) -> dict:
    """PEFT's PromptTuningConfig keys."""
    return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens,
            **model_keys(model), "prompt_tuning_init": cfg.prompt_tuning_init,
            "prompt_tuning_init_text": cfg.prompt_tuning_init_text,
            "tokenizer_name_or_path": cfg.tokenizer_name_or_path, "tokenizer_kwargs": None, "inference_mode": True}
