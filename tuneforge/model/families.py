"""What tuneforge knows about each architecture, in one table keyed by ``config.model_type``.

A family's row names, in that family's own module names, the default targets of each method (LoRA's
are PEFT's for the same model type, so an adapter trained with the defaults matches one trained
there), the experts' 3-D parameters of a Mixture-of-Experts model, and which speed-ups may replace
the model's own computation:

- ``gated_mlp``: each block's MLP is ``down(silu(gate(x)) * up(x))`` in ``gate_proj``/``up_proj``/
  ``down_proj``, so ``kernels.GatedMLP`` (the same math, less kept for backward) may stand in for it
  (the RMS norms are known by class, whatever the family: ``kernels.LLAMA_RMS_NORMS``);
- ``head_transforms``: the config keys of what the model does to the head's output before it is
  the logits (Gemma 2's ``final_logit_softcapping``). The head shortcut, which returns the targets'
  log-probabilities in place of the logits, runs only while every one of them is unset;
- ``shared_prefix``: its cache is attention keys and values only (full or sliding-window), so a
  prefix the rows of a batch share may run once and be repeated to the batch (``kv_cache`` says the
  same for prefix tuning, which an unknown family may still try).

``gguf`` says how llama.cpp runs the family (``Gguf``), which is what the GGUF writer
(``io/gguf_export.py``) reads; a family without one is not written as GGUF.

A model type that is not in the table is run through its own forward, with none of these: correct
first, then fast. ``family_of`` says so once per model type.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

ATTENTION = ("q_proj", "v_proj")
LLAMA_IA3 = ("k_proj", "v_proj", "down_proj")


@dataclass(frozen=True)
class Gguf:
    """How llama.cpp runs a family, which is what its GGUF file must say (``io/gguf_export.py``)."""

    arch: str  # llama.cpp's architecture: a gguf.MODEL_ARCH member's name
    act: str = "silu"  # the MLP activation its graph computes (a model with another is refused)
    # Whether its RoPE rotates adjacent pairs of each head's dimensions (llama's graph), so that q/k rows
    # are reordered from Hugging Face's halves; False: it rotates halves, as Hugging Face does (NeoX style)
    rope_pairs: bool = False
    norm_shift: bool = False  # its graph multiplies by the norm weight where the model uses 1 + weight (Gemma)
    windowed: bool = False  # its graph has sliding-window layers (elsewhere a window is not applied)
    # The output head: "optional" (written only when not tied), "required" (its graph reads output.weight,
    # so a tied head is written as a copy of the embedding) or "embedding" (its graph always uses the embedding)
    head: str = "optional"
    # A fused parameter llama.cpp reads as separate tensors: (suffix, parts), split in equal parts along the
    # output rows (the experts' gate_up_proj, (E, 2I, H), is gate_proj's rows then up_proj's)
    split: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Config values its graph assumes, as (key, the value it must have given the config)
    requires: tuple[tuple[str, Callable], ...] = ()
    # A fused q/k/v projection whose rows go group by group (each group's queries, then its key and value:
    # GPT-NeoX's groups are its heads, new Falcon's its key/value heads), where llama.cpp reads all of q,
    # then k, then v: the path's suffix, and the number of groups given the config (None: already q, k, v)
    qkv_by_head: str | None = None
    qkv_groups: Callable = lambda config: config.num_attention_heads


@dataclass(frozen=True)
class Family:
    name: str
    lora: tuple[str, ...] = ATTENTION  # LoRA's and QLoRA's target_modules
    vera: tuple[str, ...] | None = None  # VeRA's target_modules; None: LoRA's (PEFT's choice but for phi)
    ia3: tuple[str, ...] = LLAMA_IA3  # IA3's target_modules
    ia3_feedforward: tuple[str, ...] = ("down_proj",)  # those of IA3's targets whose input is scaled
    attn_output: tuple[str, ...] = ("o_proj",)  # the adapter's attention output (houlsby)
    mlp_output: tuple[str, ...] = ("down_proj",)  # the adapter's MLP output
    experts: tuple[str, ...] = ()  # the experts' 3-D parameters, by path under a block (LoRA's target_parameters)
    gated_mlp: bool = False
    head_transforms: tuple[str, ...] = ()
    shared_prefix: bool = True
    kv_cache: bool = True  # every layer's cache is attention keys and values (prefix tuning writes there)
    encoder: bool = False  # bidirectional (BERT and kin): its hidden states serve features; it predicts no next token
    gguf: Gguf | None = None  # how llama.cpp runs the family (None: it is not written as GGUF)
    known: bool = True

    def head_is_logits(self, config) -> bool:
        """Whether the head's output is the model's logits, with nothing applied after it."""
        return not any(getattr(config, key, None) for key in self.head_transforms)

    def head_shortcut(self, config) -> bool:
        """Whether the head shortcut may stand in for the model's own head: a known family whose head's
        output is the logits (else the model's own forward computes them)."""
        return self.known and self.head_is_logits(config)


QWEN_IA3 = ("q_proj", "v_proj", "down_proj")  # PEFT's IA3 targets for Qwen and Gemma: queries, not keys


def _llama_like(name: str, **kw) -> Family:
    return Family(name, gated_mlp=True, **kw)


def _gemma(name: str, arch: str) -> Family:  # a GeGLU MLP (gelu-tanh), a softcap on the logits where configured
    return Family(name, ia3=QWEN_IA3, head_transforms=("final_logit_softcapping",),
                  gguf=Gguf(arch, act="gelu_pytorch_tanh", norm_shift=True, windowed=arch != "GEMMA",
                            head="embedding" if arch != "GEMMA3" else "optional"))


EXPERTS_SPLIT = (("experts.gate_up_proj", ("experts.gate_proj", "experts.up_proj")),)


def _moe(name: str, gguf: Gguf | None = None) -> Family:
    # The experts are 3-D parameters, not modules: IA3 scales attention only, and the adapter sits on
    # the whole MoE block's output.
    return Family(name, ia3=("k_proj", "v_proj"), ia3_feedforward=(), mlp_output=("mlp",),
                  experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), gguf=gguf)


def _falcon_groups(config) -> int | None:
    """How Falcon's fused q/k/v rows are grouped: by key/value head (the new decoder), all queries then one
    key and one value (multi-query: already as llama.cpp reads them), or head by head."""
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return None if config.multi_query else config.num_attention_heads


def _no_rope_every_fourth(config) -> list[int]:  # llama.cpp's smollm3 graph: every 4th layer has no RoPE
    return [int((i + 1) % 4 != 0) for i in range(config.num_hidden_layers)]


def _neox(name: str, attn_output: str, gguf: Gguf | None = None) -> Family:  # fused query_key_value, 4h MLP
    return Family(name, lora=("query_key_value",), ia3=("query_key_value", "dense_4h_to_h"),
                  ia3_feedforward=("dense_4h_to_h",), attn_output=(attn_output,), mlp_output=("dense_4h_to_h",),
                  gguf=gguf)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    *(_llama_like(n, gguf=Gguf("LLAMA", rope_pairs=True)) for n in ("llama", "mistral")),
    _llama_like("smollm3", gguf=Gguf("SMOLLM3", rope_pairs=True,
                                     requires=(("no_rope_layers", _no_rope_every_fourth),))),
    _llama_like("olmo2", gguf=Gguf("OLMO2", head="required")),
    _llama_like("stablelm", gguf=Gguf("STABLELM", head="required")),
    _llama_like("qwen2", ia3=QWEN_IA3, gguf=Gguf("QWEN2")), _llama_like("qwen3", ia3=QWEN_IA3, gguf=Gguf("QWEN3")),
    # Qwen 3.5's linear-attention layers keep a recurrent state, which a cache cannot repeat to a batch
    _llama_like("qwen3_5_text", ia3=QWEN_IA3, attn_output=("o_proj", "linear_attn.out_proj"), shared_prefix=False,
                kv_cache=False),
    _gemma("gemma", "GEMMA"), _gemma("gemma2", "GEMMA2"), _gemma("gemma3_text", "GEMMA3"),
    _moe("qwen3_moe", Gguf("QWEN3MOE", split=EXPERTS_SPLIT, requires=(
        ("norm_topk_prob", lambda c: True), ("decoder_sparse_step", lambda c: 1), ("mlp_only_layers", lambda c: [])))),
    _moe("mixtral", Gguf("LLAMA", rope_pairs=True, split=EXPERTS_SPLIT)), _moe("gpt_oss"),
    Family("phi", lora=("q_proj", "v_proj", "fc1", "fc2"), vera=ATTENTION, ia3=("q_proj", "v_proj", "fc2"),
           ia3_feedforward=("fc2",), attn_output=("dense",), mlp_output=("fc2",),
           gguf=Gguf("PHI2", act="gelu_new", head="required")),
    Family("phi3", lora=("qkv_proj",), ia3=("qkv_proj", "down_proj"), gguf=Gguf("PHI3")),
    Family("gpt2", lora=("c_attn",), ia3=("c_attn", "mlp.c_proj"), ia3_feedforward=("mlp.c_proj",),
           attn_output=("attn.c_proj",), mlp_output=("mlp.c_proj",), gguf=Gguf("GPT2", act="gelu_new")),
    _neox("gpt_neox", "attention.dense",
          Gguf("GPTNEOX", act="gelu", head="required", qkv_by_head="attention.query_key_value")),
    _neox("falcon", "self_attention.dense",
          Gguf("FALCON", act="gelu", qkv_by_head="self_attention.query_key_value", qkv_groups=_falcon_groups)),
    Family("opt", ia3=("q_proj", "k_proj", "fc2"), ia3_feedforward=("fc2",), attn_output=("out_proj",),
           mlp_output=("fc2",)),
    Family("starcoder2", ia3=("k_proj", "v_proj", "mlp.c_proj"), ia3_feedforward=("mlp.c_proj",),
           mlp_output=("mlp.c_proj",), gguf=Gguf("STARCODER2", act="gelu_pytorch_tanh")),
    # Encoders load as "causal" heads too (BertLMHeadModel), but their attention sees the whole text
    *(Family(n, encoder=True) for n in ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "albert",
                                        "electra", "deberta", "deberta-v2", "modernbert")),
]}

_told: set[str] = set()


def family_of(model_or_config) -> Family:
    """The family of a model (or of its config); an unknown model type gets a row with the common
    (llama) names and no speed-up, and the user is told once that it runs unaccelerated."""
    config = getattr(model_or_config, "config", model_or_config)
    name = getattr(config, "model_type", "") or type(config).__name__
    family = FAMILIES.get(name)
    if family is not None:
        return family
    if name not in _told:
        _told.add(name)
        print(f"tuneforge: {name!r} is not a family tuneforge knows; it trains correctly through the model's own "
              "forward, without the speed-ups of known families (docs/models.md lists them)", file=sys.stderr)
    return Family(name, shared_prefix=False, known=False)


def context_length(config) -> int | None:
    """The most positions the model takes (learned position tables, GPT-2's and OPT's, have no more)."""
    text = config.get_text_config()
    return next((getattr(text, k) for k in ("max_position_embeddings", "n_positions") if getattr(text, k, None)), None)
