"""Tiny random causal LMs of many model families, built in code from transformers' config classes.

Every model is 64 wide with 2 layers, 4 attention heads (2 key/value heads where the family has
grouped-query attention), an MLP of 128, 512 positions and no dropout. Mixture-of-experts families
have 4 experts with 2 active; families with a sliding window get a window of 16 tokens so that it
is exercised by short test sequences. Token ids: pad 0, bos 1, eos 2.

    model = tiny_model("qwen3_moe")           # float32, eval mode
    cfg = tiny_config("gemma2", vocab_size=512)
"""

from __future__ import annotations

from typing import Callable

import torch
import transformers as tf
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# Shared by the llama-like families (their config classes use these names).
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=512, attention_dropout=0.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 16
MOE = dict(num_experts_per_tok=2)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=128)


def _llama_like(cls: type, **kw) -> Callable[..., PretrainedConfig]:
    return lambda vocab_size, **changes: cls(**{**BASE, "vocab_size": vocab_size, **kw, **changes})


def _custom(cls: type, **kw) -> Callable[[int], PretrainedConfig]:
    """For families whose config does not use the llama names (no BASE)."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return lambda vocab_size, **changes: cls(**{**ids, "vocab_size": vocab_size, **kw, **changes})


FAMILIES: dict[str, Callable[..., PretrainedConfig]] = {
    "llama": _llama_like(tf.LlamaConfig),
    "llama3": _llama_like(tf.LlamaConfig, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
    "mistral": _llama_like(tf.MistralConfig, sliding_window=WINDOW),
    # qwen2/qwen3: layers >= max_window_layers use the sliding window (layer 0 full, layer 1 sliding).
    "qwen2": _llama_like(tf.Qwen2Config, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": _llama_like(tf.Qwen3Config, head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                         max_window_layers=1),
    "qwen3_moe": _llama_like(tf.Qwen3MoeConfig, head_dim=16, num_experts=4, moe_intermediate_size=128, **MOE),
    "mixtral": _llama_like(tf.MixtralConfig, num_local_experts=4, sliding_window=WINDOW, **MOE),
    # gpt_oss alternates sliding / full layers by default.
    "gpt_oss": _llama_like(tf.GptOssConfig, head_dim=16, num_local_experts=4, sliding_window=WINDOW, **MOE,
                           rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                                beta_slow=1.0, truncate=False, original_max_position_embeddings=128)),
    "gemma": _llama_like(tf.GemmaConfig, head_dim=16),
    # gemma2 keeps its default softcaps (final_logit_softcapping=30, attn_logit_softcapping=50).
    "gemma2": _llama_like(tf.Gemma2Config, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW),
    "gemma3_text": _llama_like(tf.Gemma3TextConfig, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                               layer_types=["sliding_attention", "full_attention"]),
    "phi": _llama_like(tf.PhiConfig, num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0),
    "phi3": _llama_like(tf.Phi3Config, resid_pdrop=0.0, embd_pdrop=0.0, sliding_window=WINDOW,
                        original_max_position_embeddings=512),
    "gpt2": _custom(tf.GPT2Config, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0),
    "gpt_neox": _custom(tf.GPTNeoXConfig, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, hidden_dropout=0.0,
                        attention_dropout=0.0, classifier_dropout=0.0),
    # falcon-40b style: new decoder architecture with grouped-query attention.
    "falcon": _custom(tf.FalconConfig, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                      new_decoder_architecture=True, ffn_hidden_size=128, max_position_embeddings=512,
                      hidden_dropout=0.0, attention_dropout=0.0),
    "opt": _custom(tf.OPTConfig, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                   max_position_embeddings=512, dropout=0.0, attention_dropout=0.0, layerdrop=0.0),
    "starcoder2": _llama_like(tf.Starcoder2Config, sliding_window=WINDOW, residual_dropout=0.0,
                              embedding_dropout=0.0),
    # smollm3: layer 1 has no rotary embedding (NoPE), as every 4th layer of the real model.
    "smollm3": _llama_like(tf.SmolLM3Config, no_rope_layers=[1, 0]),
    # qwen3_5_text: a hybrid of one gated-delta-net (linear attention) layer and one full-attention layer.
    "qwen3_5_text": _llama_like(tf.Qwen3_5TextConfig, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
                                linear_num_key_heads=2, linear_num_value_heads=4,
                                layer_types=["linear_attention", "full_attention"]),
    "olmo2": _llama_like(tf.Olmo2Config),
    "stablelm": _llama_like(tf.StableLmConfig, hidden_dropout=0.0),
}


def tiny_config(name: str, vocab_size: int = 300, **changes) -> PretrainedConfig:
    """The config of the tiny model `name` (a key of FAMILIES), with ``changes`` to its keys."""
    return FAMILIES[name](vocab_size, **changes)


def tiny_model(name: str, vocab_size: int = 300, seed: int = 0,
               attn_implementation: str | None = None) -> PreTrainedModel:
    """A tiny random causal LM of family `name`, float32, in eval mode; the same for the same seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, vocab_size), dtype=torch.float32,
                                             attn_implementation=attn_implementation)
    return model.eval()
