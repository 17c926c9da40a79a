"""Prefix tuning (Li & Liang 2021): n trainable key and value vectors in every attention layer, which
each real token attends to as if n earlier tokens had left them in the KV cache. There is no
identity start: any prefix takes a share of the attention.

Attached by forward hooks on the model, never by forking it, like prompt tuning (prompt.py):
- a call that starts a sequence (no cache, or ``generate``'s empty one) gets a transformers
  DynamicCache holding the prefix, (batch, kv_heads, n, head_dim) per layer for keys and for values
  (grouped-query attention caches kv_heads, not query heads);
- every call's 2-D attention mask gets n ones on the left; given position_ids shift by n, and
  without them the model counts on from the n cached entries: real tokens hold positions n..,
  as in PEFT, whose logits these match;
- a call with use_cache off returns no cache (the caller asked for none; ``generate`` would feed
  it back).
With ``prefix_projection`` the prefix is a two-layer MLP (Linear, tanh, Linear) over an embedding
while it trains (the reparameterization of Li & Liang). The file holds the prefix that MLP computes,
so it is PEFT's plain format, {"prompt_embeddings": (n, layers * 2 * kv_heads * head_dim)}, the
last axis ordered (layer, key|value, head, dim). Gradient checkpointing drops caches: it is refused.

A prefix starts as N(0, 1) noise (PEFT's default), zeros, or, with ``init_text``, the keys and values
the model computes for that text at positions 0..n-1: then the prefixed model is exactly the base model
reading the text first, and training starts from a prompt rather than from noise (Li & Liang found
initializing from real words' activations matters most in low-data settings).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.utils import ModelOutput

from tuneforge.core.errors import UserError
from tuneforge.model.families import family_of
from tuneforge.methods import _virtual
from tuneforge.methods._shared import (Injected, MethodModule, before_inject, check_state, injected, method_parameters,
                                       no_lora_form)
from tuneforge.core.config.methods import PrefixConfig as Config

NAME, KIND, PEFT_TYPE, WHOLE_MODEL, MERGES = "prefix", "gradient", "PREFIX_TUNING", False, False
ADDS = "adds keys and values before each layer's attention"  # instead of changing its weights


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's attention."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


def model_keys(model: nn.Module) -> dict:
    layers, kv_heads, head_dim = kv_shape(model)
    return {"token_dim": kv_heads * head_dim, "num_layers": layers, "num_attention_heads": kv_heads,
            "num_transformer_submodules": 1}


class Prefix(nn.Module, MethodModule):
    """The prefix: ``embedding`` itself, or ``transform(embedding)`` with the projection."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int], arg_names: list[str], device):
        super().__init__()
        layers, kv_heads, head_dim = self.shape = shape
        n, token_dim, width = cfg.num_virtual_tokens, kv_heads * head_dim, layers * 2 * kv_heads * head_dim
        self.arg_names = arg_names
        self.transform = None
        if cfg.prefix_projection:
            hidden = cfg.encoder_hidden_size or token_dim
            self.embedding = nn.Parameter(torch.randn(n, token_dim, device=device))
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden, device=device), nn.Tanh(),
                                           nn.Linear(hidden, width, device=device))
            zeroed = self.transform[2].parameters()
        else:
            self.embedding = nn.Parameter(torch.randn(n, width, device=device))
            zeroed = [self.embedding]
        if cfg.init_weights == "zero":
            for p in zeroed:
                nn.init.zeros_(p)

    def prefix(self) -> Tensor:  # (n, layers * 2 * kv_heads * head_dim)
        return self.embedding if self.transform is None else self.transform(self.embedding)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the prefix it computes."""
        if self.transform is not None:
            self.embedding, self.transform = nn.Parameter(self.prefix().detach().clone()), None

    def fill(self, cache, batch: int, dtype: torch.dtype):
        layers, kv_heads, head_dim = self.shape
        n = self.embedding.shape[0]
        kv = self.prefix().to(dtype).view(n, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)  # (2L, H, n, D)
        for layer in range(layers):
            keys, values = kv[2 * layer], kv[2 * layer + 1]  # (H, n, D) each
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        return cache


@torch.no_grad()
def text_prefix(model: nn.Module, ids: list[int]) -> Tensor:
    """(n, layers * 2 * kv_heads * head_dim): the keys and values ``model`` caches for ``ids`` at
    positions 0..n-1, in the saved layout; real tokens then start at position n, right after them."""
    was_training = model.training
    model.eval()
    try:
        device = model.get_input_embeddings().weight.device
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    finally:
        model.train(was_training)
    cache = next(getattr(out, k) for k in _virtual.CACHE_ARGS if getattr(out, k, None) is not None)
    kv = [t[0] for layer in cache.layers for t in (layer.keys, layer.values)]  # 2L x (H, n, D)
    return torch.stack(kv).permute(2, 0, 1, 3).reshape(len(ids), -1).float()  # (n, 2L, H, D) -> (n, 2L*H*D)


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    prefix = _virtual.find(model, Prefix)
    if not prefix.enabled:
        return None
    kwargs = _virtual.named_inputs(prefix.arg_names, args, kwargs)
    if model.training and torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False)
                                                          for m in model.modules()):
        raise UserError("prefix tuning feeds its prefix through the KV cache, which gradient checkpointing drops",
                        "train.gradient_checkpointing", fix="set train.gradient_checkpointing: false")
    if _virtual.starts_sequence(kwargs):
        inputs = kwargs.get("input_ids")
        inputs = kwargs["inputs_embeds"] if inputs is None else inputs
        cache = _virtual.cache_in(kwargs)
        key = _virtual.cache_arg(kwargs, prefix.arg_names)
        device = prefix.embedding.device.type  # under autocast the keys come out in the autocast dtype
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # none on meta
        dtype = torch.get_autocast_dtype(device) if autocast else model.dtype
        kwargs[key] = prefix.fill(DynamicCache(config=model.config) if cache is None else cache, inputs.shape[0],
                                  dtype)
    _virtual.widen(kwargs, prefix.embedding.shape[0], lead_positions=False)
    return (), kwargs


def _after_forward(model: nn.Module, args: tuple, kwargs: dict, output):
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(model.config, "use_cache", True)
    if use_cache or not isinstance(output, ModelOutput):
        return None
    return type(output)(**{k: v for k, v in output.items() if k not in _virtual.CACHE_ARGS})


def inject(model: nn.Module, cfg: Config, tokenizer=None) -> Injected:
    """Freeze the model and give every attention layer a trainable prefix. ``tokenizer`` splits
    ``init_text``; without it, ``tokenizer_name_or_path`` or else the model's folder is read."""
    base = before_inject(model)
    family = family_of(model)
    if not family.kv_cache:
        raise UserError(f"prefix tuning puts keys and values before every layer's attention, and {family.name}'s "
                        "cache also holds layers of another kind (a linear-attention state)", "method.name",
                        fix="use prompt tuning (method.name: prompt), LoRA or IA3 for this model")
    _virtual.check_model_keys(cfg, model_keys(model))
    init = None
    if cfg.init_text is not None:
        tokenizer, source = _virtual.text_tokenizer(model, cfg.tokenizer_name_or_path, tokenizer, "init_text")
        ids = _virtual.text_ids(tokenizer, cfg.init_text, cfg.num_virtual_tokens, "method.init_text")
        init, cfg = text_prefix(model, ids), replace(cfg, tokenizer_name_or_path=source)
    model.requires_grad_(False)
    device = model.get_input_embeddings().weight.device
    prefix = Prefix(cfg, kv_shape(model), _virtual.forward_arg_names(model), device)
    if init is not None:
        with torch.no_grad():
            prefix.embedding.copy_(init)
    _virtual.attach(model, "tuneforge_prefix", prefix, _before_forward, _after_forward)
    return injected(__name__, cfg, base)


def for_loading(cfg: Config) -> Config:
    """The config to inject before loading saved weights: no text to run through the model."""
    return replace(cfg, init_text=None)


def trainable(model: nn.Module, cfg: Config) -> dict[str, nn.Parameter]:
    return method_parameters(model, (Prefix,))


def state_dict(model: nn.Module, cfg: Config) -> dict[str, Tensor]:
    """The prefix itself, computed through the MLP when there is one: PEFT's saved form."""
    with torch.no_grad():
        return {"prompt_embeddings": _virtual.find(model, Prefix).prefix().detach()}


def load_state_dict(model: nn.Module, cfg: Config, sd: dict[str, Tensor]) -> None:
    """Load a saved prefix; a model built with the projection drops its MLP for it (the saved prefix is
    what the MLP computed, and the MLP cannot be recovered from it)."""
    prefix = _virtual.find(model, Prefix)
    layers, kv_heads, head_dim = prefix.shape
    check_state({"prompt_embeddings": (prefix.embedding.shape[0], layers * 2 * kv_heads * head_dim)}, sd,
                fix="load an adapter saved with method prefix (PEFT: PREFIX_TUNING), with this num_virtual_tokens, "
                    "on its base model")
    prefix.fold()
    with torch.no_grad():
        prefix.embedding.copy_(sd["prompt_embeddings"])


def merge(model: nn.Module, cfg: Config | None = None) -> None:
    _virtual.no_merge("a prefix is extra keys and values in the attention")


def file_config(model: nn.Module, cfg: Config) -> dict:
    """PEFT's PrefixTuningConfig keys. prefix_projection is written false: the file holds the folded prefix,
    which PEFT loads (for inference or further training) only as a plain prefix."""
    keys = model_keys(model)
    return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens, **keys,
            "encoder_hidden_size": cfg.encoder_hidden_size or keys["token_dim"], "prefix_projection": False,
            "init_weights": cfg.init_weights, "inference_mode": True}


def lora_form(model: nn.Module, cfg: Config | None = None) -> dict:
    no_lora_form("a prefix is extra keys and values in the attention")
