"""GGUF files for llama.cpp (and Ollama, LM Studio), written with the `gguf` package: no compiled tool.

    write_model  a whole model: the architecture's hyperparameters under ``<arch>.*``, every weight
                 under llama.cpp's tensor names (``blk.N.attn_q.weight``, ...), the tokenizer under
                 ``tokenizer.ggml.*`` and the chat template
    write_lora   a LoRA adapter: ``general.type = adapter``, ``adapter.type = lora``,
                 ``adapter.lora.alpha``, and ``<tensor>.lora_a`` (r, in) / ``<tensor>.lora_b`` (out, r)

Which architecture a family is in llama.cpp, and how its RoPE reads q and k, is the family table's
(``model/families.py``: ``gguf_arch``, ``rope_pairs``); the tensor names are the gguf package's own
table for that architecture. Two facts about llama.cpp shape what is written. Its llama graph applies
RoPE to adjacent pairs of each head's dimensions, where Hugging Face's rotates the first half against
the second, so there the rows of q_proj and k_proj (and of B in a LoRA on them) are reordered head by
head; Qwen's graph rotates halves, as Hugging Face does. And it scales a LoRA by alpha / r with r read
from B's shape, so alpha is written as s * r, where s is the scale the adapter trained with (alpha /
r, or alpha / sqrt(r) with rsLoRA). Llama 3's RoPE scaling is a tensor of per-frequency factors
(``rope_freqs``), computed here as llama.cpp's converter computes it.

When the base came as a GGUF file, its tokenizer and descriptive keys (``general.name``, the
license, ...) are copied from it rather than rebuilt from the Hugging Face tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tuneforge.core.atomic import atomic_path
from tuneforge.core.errors import UserError
from tuneforge.io import gguf_vocab
from tuneforge.model.families import FAMILIES, Gguf, family_of

# The dtypes written: those the gguf package encodes itself. Its k-quants (Q4_K_M, ...) decode only, so
# they are not offered; llama.cpp's llama-quantize makes them from the f16 file.
DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
QTYPES = {dtype: gguf.GGMLQuantizationType[dtype.upper()] for dtype in DTYPES}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, **{dtype: gguf.LlamaFileType[f"MOSTLY_{dtype.upper()}"]
                                                   for dtype in DTYPES[1:]}}
# In a 4- or 5-bit file the embedding and the head stay 8-bit, as llama-quantize keeps them finer (it
# writes Q6_K there, which the gguf package cannot).
FINER = {"token_embd.weight", "output.weight"}
ADAPTER_TYPE = "lora"  # GGUF's adapter.type for a low-rank adapter (llama.cpp reads no other)


def check_dtype(dtype: str) -> None:
    if dtype not in QTYPES:
        raise UserError(f"tuneforge does not write GGUF tensors of dtype {dtype!r}", "--dtype",
                        fix=f"use one of {', '.join(DTYPES)} (for k-quants such as q4_K_M, run llama.cpp's "
                            "llama-quantize on the f16 file)")


def written() -> list[str]:
    """The model types written to GGUF."""
    return sorted(name for name, family in FAMILIES.items() if family.gguf)


ROPE_TYPES = ("default", "llama3", "linear")  # how a model scales RoPE, of those llama.cpp reads from a file
KEEP_HF = "export it with --format hf and serve it with transformers"


def full_rope(config) -> dict:
    """The RoPE of the full-attention layers (Gemma 3 keeps one per layer kind); {} for a model with
    learned positions (GPT-2)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return dict(rope.get("full_attention", rope))


def _the_model(config) -> str:
    """Where a refusal points: the model (given by --model, or the base an adapter records), by its type."""
    return f"the model ({config.model_type})"


def form(config) -> Gguf:
    """How llama.cpp runs the model, or a UserError that names the family and what llama.cpp lacks."""
    family = family_of(config)
    shape = family.gguf
    where = _the_model(config)
    if shape is None:
        raise UserError(f"llama.cpp has no graph tuneforge writes for {family.name!r} (GGUF is written for "
                        f"{', '.join(written())})", where, fix=KEEP_HF)
    graph = f"llama.cpp's {shape.arch.lower()} graph"
    rope = full_rope(config)
    act = next((getattr(config, k) for k in ("hidden_activation", "activation", "activation_function", "hidden_act")
                if getattr(config, k, None)), "silu")
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise UserError(f"this {family.name} scales RoPE as {rope['rope_type']!r}, which tuneforge does not write for "
                        f"{graph} (it writes {', '.join(ROPE_TYPES)})", where, fix=KEEP_HF)
    if act != shape.act:
        raise UserError(f"this {family.name} uses a {act!r} activation, and {graph} computes {shape.act!r}",
                        where, fix=KEEP_HF)
    for key, expected in shape.requires:
        if (value := getattr(config, key, None)) != (want := expected(config)):
            raise UserError(f"{graph} assumes {key} = {want!r}, and this model has {value!r}", where, fix=KEEP_HF)
    if shape.head == "embedding" and not config.tie_word_embeddings:
        raise UserError(f"{graph} uses the embedding as the output head, and this model has its own", where,
                        fix=KEEP_HF)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != head_dim(config):
        raise UserError(f"this {family.name} scales attention by 1/sqrt({scalar}), and llama.cpp by 1/sqrt(head_dim "
                        f"{head_dim(config)})", where, fix=KEEP_HF)
    return shape


def architecture(config) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for the model, or a UserError (see ``form``)."""
    return gguf.MODEL_ARCH[form(config).arch]


def note_window(config) -> None:
    """One line where the model attends within a window and llama.cpp's graph for it has none."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and window < config.max_position_embeddings and not form(config).windowed:
        print(f"tuneforge: llama.cpp's {form(config).arch.lower()} graph attends to every earlier position, where "
              f"this model attends to the last {window}: beyond {window} tokens their outputs differ", file=sys.stderr)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def first(config, *keys: str, default=None):
    """The first of ``keys`` the config sets (families name the same number differently)."""
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), default)


def hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    """The ``<arch>.*`` keys llama.cpp builds the graph from."""
    rope, shape = full_rope(config), form(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(first(config, "intermediate_size", "ffn_hidden_size", "n_inner",
                                              default=4 * config.hidden_size))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(first(config, "num_key_value_heads", "num_kv_heads", default=config.num_attention_heads))
    if rope:  # else learned positions (GPT-2's position_embd)
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        # a partial rotary (StableLM, Phi-2, GPT-NeoX) turns the first part of each head's dimensions
        writer.add_rope_dimension_count(int(head_dim(config) * rope.get("partial_rotary_factor", 1.0)))
    if getattr(config, "use_parallel_residual", None) is not None:  # GPT-NeoX: attention and MLP side by side
        writer.add_parallel_residual(bool(config.use_parallel_residual))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    else:  # LayerNorm (StarCoder2, GPT-2)
        writer.add_layer_norm_eps(first(config, "norm_epsilon", "layer_norm_eps", "layer_norm_epsilon"))
    if head_dim(config) != config.hidden_size // config.num_attention_heads or shape.norm_shift:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if experts := first(config, "num_experts", "num_local_experts"):
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if getattr(config, key, None):
            add(float(getattr(config, key)))
    if shape.windowed and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
        kinds = getattr(config, "layer_types", None)
        if kinds:  # which layers attend within the window: llama.cpp's default pattern is not every model's
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in kinds])
        local = dict(getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
        if local:
            writer.add_rope_freq_base_swa(float(local["rope_theta"]))


def rope_rows(rows: Tensor, heads: int) -> Tensor:
    """(heads * d, ...) rows of a q or k projection, each head's halves [x0..x(d/2-1) | y0..] reordered to
    llama.cpp's adjacent pairs [x0 y0 x1 y1 ...]."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def permuted(path: str, rows: Tensor, config) -> Tensor:
    """``rows`` (a weight, a bias or a LoRA's B of the layer at ``path``) in the order llama.cpp reads
    them: a fused q/k/v stored head by head regrouped as q, k, v; q and k rows in adjacent pairs where
    its RoPE rotates pairs."""
    shape = form(config)
    if shape.qkv_by_head and path.endswith(shape.qkv_by_head) and (groups := shape.qkv_groups(config)):
        per = config.num_attention_heads // groups  # queries a group: (groups, per + 2, d, ...) -> q, k, v
        grouped = rows.reshape(groups, per + 2, rows.shape[0] // groups // (per + 2), *rows.shape[1:])
        return torch.cat([grouped[:, :per].flatten(0, 2), grouped[:, per].flatten(0, 1),
                          grouped[:, per + 1].flatten(0, 1)])
    if not shape.rope_pairs:
        return rows
    if path.endswith("self_attn.q_proj"):
        return rope_rows(rows, config.num_attention_heads)
    if path.endswith("self_attn.k_proj"):
        return rope_rows(rows, config.num_key_value_heads or config.num_attention_heads)
    return rows


def rope_factors(config) -> np.ndarray | None:
    """Llama 3's RoPE scaling as llama.cpp reads it: one factor per frequency (head_dim / 2), each
    frequency divided by its factor; None for any other RoPE."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type") != "llama3":
        return None
    dim = head_dim(config)
    freqs = 1.0 / (float(rope.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    wavelength = 2 * np.pi / freqs
    smooth = (old / wavelength - low) / (high - low)  # between the two bands: interpolated
    factors = np.where(wavelength < old / high, 1.0,
                       np.where(wavelength > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def encode(array: np.ndarray, dtype: str, name: str = "") -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A float32 array in ``dtype``: vectors (norms, biases) stay f32, as llama.cpp keeps them; a matrix
    whose rows do not split into the blocks of 32 of a quantized type is written f16 instead, as
    llama.cpp's converter does; the embedding and head of a 4- or 5-bit file are written Q8_0."""
    qtype = QTYPES[dtype if not (name in FINER and dtype[1] in "45") else "q8_0"]
    if array.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16 or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def model_tensors(model: nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, in llama.cpp's layout: Conv1D's (in, out) weights
    transposed, fused parameters split where llama.cpp reads them apart, a tied head written only where
    llama.cpp's graph reads one."""
    config = model.config
    shape = form(config)
    names = gguf.get_tensor_name_map(architecture(config), config.num_hidden_layers)

    def name_of(key: str) -> str:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"the model holds a tensor llama.cpp has no name for ({key})",
                            _the_model(config),
                            fix="export a merged model (a method that cannot be merged stays outside: use --format hf)")
        return name if name.endswith((".weight", ".bias")) else name + ".weight"  # a bare parameter: the experts'

    if (factors := rope_factors(config)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors
    state = model.state_dict()
    for key, tensor in state.items():
        path = key.rsplit(".", 1)[0]
        if key == "lm_head.weight" and config.tie_word_embeddings:
            if shape.head != "required":
                continue
            tensor = model.get_input_embeddings().weight
        if shape.norm_shift and key.endswith("norm.weight"):  # Gemma computes x * (1 + weight)
            tensor = tensor.float() + 1
        if key.endswith(".weight") and isinstance(model.get_submodule(path), Conv1D):
            tensor = tensor.t()
        for suffix, parts in shape.split:
            if key.endswith(suffix):
                for part, rows in zip(parts, tensor.chunk(len(parts), dim=-2)):
                    yield name_of(key[:-len(suffix)] + part), _numpy(rows)
                break
        else:
            yield name_of(key), _numpy(permuted(path, tensor, config))


def write(out: Path, arch: gguf.MODEL_ARCH, fill) -> Path:
    """One GGUF file, atomically: ``fill(writer)`` adds the keys and tensors."""
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def write_model(model: nn.Module, tokenizer, out: str | Path, dtype: str = "f32", source: Path | None = None
                ) -> Path:
    """``model`` (merged, or full fine-tuning's) as one GGUF file for llama.cpp. ``source``:
    the GGUF file the base came from, whose tokenizer and descriptive keys are carried over."""
    check_dtype(dtype)
    arch = architecture(model.config)
    note_window(model.config)
    carried = gguf_vocab.carried_fields(source, model.config.vocab_size) if source is not None else None

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        hyperparameters(writer, model.config)
        writer.add_file_type(FILE_TYPES[dtype])
        if dtype.startswith("q"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if carried is None:
            writer.add_name(Path(out).stem)
            gguf_vocab.tokenizer_fields(writer, tokenizer, model.config.vocab_size)
        if getattr(tokenizer, "chat_template", None):
            writer.add_chat_template(tokenizer.chat_template)
        for key, (value, vtype, sub) in (carried or {}).items():
            if key not in writer.kv_data[0]:  # what this file states itself (its hyperparameters) wins
                writer.add_key_value(key, value, vtype, sub)
        for name, array in model_tensors(model):
            data, qtype = encode(array, dtype, name)
            writer.add_tensor(name, data, raw_dtype=qtype)

    return write(Path(out), arch, fill)


def write_lora(model: nn.Module, form: dict[str, tuple[Tensor, Tensor, float]], out: str | Path,
               dtype: str = "f32") -> Path:
    """A LoRA adapter (``form``: each layer's A, B and scale, from the method's ``lora_form``) as a GGUF
    adapter file, for ``llama-cli --lora`` and Ollama's ``ADAPTER``."""
    check_dtype(dtype)
    config = model.config
    arch = architecture(config)
    note_window(config)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    if not form:
        raise UserError("the adapter wraps no layer", "--adapter")
    first_a, _, first_scale = next(iter(form.values()))
    alpha = first_scale * first_a.shape[0]  # llama.cpp scales by alpha / r

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, ADAPTER_TYPE)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(FILE_TYPES[dtype])
        for path, (a, b, scale) in form.items():
            name = names.get_name(path + ".weight", try_suffixes=(".weight",))
            if name is None or (path == "lm_head" and config.tie_word_embeddings):
                raise UserError(f"the adapter changes {path}, which llama.cpp's model file has no separate tensor "
                                "for", "--adapter", fix="export the merged model: --format gguf")
            # A layer whose scale alpha / r does not give (another rank) has the difference folded into B.
            b = b.float() * (scale / (alpha / a.shape[0]))
            for suffix, array in ((".lora_a", a), (".lora_b", permuted(path, b, config))):
                data, qtype = encode(_numpy(array), dtype)
                writer.add_tensor(name + suffix, data, raw_dtype=qtype)

    return write(Path(out), arch, fill)
