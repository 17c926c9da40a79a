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
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuneforge.methods import _virtual
from tuneforge.methods._shared import (Injected, MethodModule, before_inject, injected, load_exact, method_parameters,
                                       no_lora_form)
from tuneforge.core.config.methods import PromptConfig as Config

NAME, KIND, PEFT_TYPE, WHOLE_MODEL, MERGES = "prompt", "gradient", "PROMPT_TUNING", False, False
ADDS = "adds virtual tokens before the input"  # instead of changing its weights


class SoftPrompt(nn.Module, MethodModule):
    """The n prompt vectors, kept in float32 whatever the model's dtype."""

    def __init__(self, init: Tensor, arg_names: list[str], trims_logits: bool):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(init.detach().float().clone())  # (n, hidden)
        self.arg_names, self.trims_logits = arg_names, trims_logits


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    prompt = _virtual.find(model, SoftPrompt)
    if not prompt.enabled:
        return None
    kwargs = _virtual.named_inputs(prompt.arg_names, args, kwargs)
    n, fresh = prompt.prompt_embeddings.shape[0], _virtual.starts_sequence(kwargs)
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
    _virtual.widen(kwargs, n, lead_positions=fresh)
    return (), kwargs


def model_keys(model: nn.Module) -> dict:
    cfg = model.config.get_text_config()
    return {"token_dim": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_transformer_submodules": 1}


def initial_prompt(model: nn.Module, cfg: Config, tokenizer=None) -> tuple[Tensor, Config]:
    """(n, hidden) starting vectors, and the config with the tokenizer TEXT used recorded in it."""
    table = model.get_input_embeddings().weight  # (vocab, hidden)
    n = cfg.num_virtual_tokens
    if cfg.prompt_tuning_init == "RANDOM":  # at the scale of real token embeddings
        return torch.randn(n, table.shape[1], device=table.device) * table.detach().float().std(), cfg
    if cfg.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, table.shape[0], (n,)).tolist()
    else:
        what = "prompt_tuning_init TEXT"
        tokenizer, source = _virtual.text_tokenizer(model, cfg.tokenizer_name_or_path, tokenizer, what)
        ids = _virtual.text_ids(tokenizer, cfg.prompt_tuning_init_text, n, "method.prompt_tuning_init_text")
        cfg = replace(cfg, tokenizer_name_or_path=source)
    return table.detach()[torch.tensor(ids, device=table.device)].float(), cfg


def inject(model: nn.Module, cfg: Config, tokenizer=None) -> Injected:
    """Freeze the model and give it a soft prompt. ``tokenizer`` serves TEXT initialization; without
    it, ``tokenizer_name_or_path`` or else the folder the model was loaded from is read. The handle's
    config records the tokenizer TEXT used."""
    base = before_inject(model)
    _virtual.check_model_keys(cfg, model_keys(model))
    init, cfg = initial_prompt(model, cfg, tokenizer)
    model.requires_grad_(False)
    arg_names = _virtual.forward_arg_names(model)
    _virtual.attach(model, "tuneforge_prompt", SoftPrompt(init, arg_names, trims_logits="logits_to_keep" in arg_names),
                    _before_forward)
    return injected(__name__, cfg, base)


def for_loading(cfg: Config) -> Config:
    """The config to inject before loading saved weights: no tokenizer to find for TEXT (a few
    vocabulary rows are the cheapest start to overwrite)."""
    return replace(cfg, prompt_tuning_init="SAMPLE_VOCAB")


def trainable(model: nn.Module, cfg: Config) -> dict[str, nn.Parameter]:
    return method_parameters(model, (SoftPrompt,))


def state_dict(model: nn.Module, cfg: Config) -> dict[str, Tensor]:
    return {"prompt_embeddings": _virtual.find(model, SoftPrompt).prompt_embeddings.detach()}


def load_state_dict(model: nn.Module, cfg: Config, sd: dict[str, Tensor]) -> None:
    params = {"prompt_embeddings": _virtual.find(model, SoftPrompt).prompt_embeddings}
    load_exact(params, sd, fix="load an adapter saved with method prompt (PEFT: PROMPT_TUNING), with this "
                               "num_virtual_tokens, on its base model")


def merge(model: nn.Module, cfg: Config | None = None) -> None:
    _virtual.no_merge("a soft prompt is extra input")


def file_config(model: nn.Module, cfg: Config) -> dict:
    """PEFT's PromptTuningConfig keys."""
    return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens,
            **model_keys(model), "prompt_tuning_init": cfg.prompt_tuning_init,
            "prompt_tuning_init_text": cfg.prompt_tuning_init_text,
            "tokenizer_name_or_path": cfg.tokenizer_name_or_path, "tokenizer_kwargs": None, "inference_mode": True}


def lora_form(model: nn.Module, cfg: Config | None = None) -> dict:
    no_lora_form("a soft prompt is extra input embeddings")
