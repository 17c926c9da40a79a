"""QLoRA (Dettmers et al. 2023): the targeted linear layers are quantized to 4-bit NF4, then LoRA goes on
top of them. Composition, not a new layer: ``quant.nf4.quantize_linears_`` replaces each target by an
NF4Linear (packed codes and scales, rebuilt in ``compute_dtype`` for every matmul, no float copy kept),
and ``lora.inject`` wraps those layers exactly as it wraps dense ones: y = W_nf4 x + s * B A x.

Only LoRA's A and B train, in float32. Embeddings, the head and the norms are not quantized (see
``memory_report`` for why) and are held in the compute dtype, which is the dtype load_model picks by
default on the model's device (fp32 on CPU, bf16 on CUDA). On disk a QLoRA adapter is a PEFT LoRA
adapter; tuneforge's metadata says "qlora", so ``load_adapter`` quantizes the full-precision base it is
given before loading, and evaluation sees the 4-bit weights the adapter was trained against.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from tuneforge.model.devices import resolve_dtype
from tuneforge.methods import lora
from tuneforge.methods._shared import Injected, before_inject, injected, prefixed_hooks, same_config
from tuneforge.core.config.methods import QLoraConfig as Config
from tuneforge.core.errors import TuneforgeWarning
from tuneforge.quant.nf4 import NF4Linear, quantize_linears_

NAME, KIND, WHOLE_MODEL, MERGES = "qlora", "gradient", False, True
ADDS = None  # its change is a change of weights
PEFT_TYPE = "LORA"  # the adapter is LoRA's; how the base is held in memory is not part of it


def inject(model: nn.Module, cfg: Config) -> Injected:
    """Quantize the targeted linear layers to NF4, then put LoRA on them. The unquantized tensors
    (embeddings, head, norms) are cast to ``compute_dtype`` if they are in another dtype; LoRA's are float32."""
    base = before_inject(model, quantized_too=True)
    names, saved = lora.find(model, cfg.lora())  # LoRA's checks, while nothing has changed
    compute_dtype = resolve_dtype(cfg.compute_dtype, next(model.parameters()).device)
    before = memory_report(model)["total_bytes"]
    # One dtype for the whole forward: what the quantized layers return feeds the norms, the head and
    # the next layer's input. A no-op for a model loaded with the default dtype on its device.
    model.to(dtype=compute_dtype)
    quantize_linears_(model, names, cfg.block_size, cfg.double_quant, compute_dtype=compute_dtype)
    _release_checkpoint(model)
    after = memory_report(model)
    if next(model.parameters()).device.type != "meta":  # estimate.py injects into a weightless copy
        print(f"tuneforge: qlora: {after['quantized_layers']} linear layers to NF4 ({after['bits_per_weight']:.3f} "
              f"bits per weight), computing in {str(compute_dtype).removeprefix('torch.')}; model "
              f"{before / 2**20:.2f} MiB -> {after['total_bytes'] / 2**20:.2f} MiB", file=sys.stderr)
    lora.attach(model, cfg.lora(), names, saved)
    return injected(__name__, cfg, base)


@torch.no_grad()
def _release_checkpoint(model: nn.Module) -> None:
    """Copy the tensors left unquantized into memory of their own.

    transformers maps a safetensors checkpoint into memory and its tensors view the mapping. Quantizing
    reads every page of it, and the pages stay resident (counted in the process's memory) for as long as
    any tensor still views the file, the embedding for one; the copies let the whole mapping go. Tied
    tensors stay tied: the Parameter objects are kept and only their data is replaced. Only CPU tensors
    can view the file; a model moved to another device owns its memory already.
    """
    for param in model.parameters():  # each once, tied or not
        if param.device.type == "cpu":
            param.data = param.data.clone()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type == "cpu" and not isinstance(module, NF4Linear):
                module._buffers[name] = buffer.clone()


def trainable(model: nn.Module, cfg: Config) -> dict[str, nn.Parameter]:
    return lora.trainable(model, cfg.lora())


state_dict, load_state_dict = prefixed_hooks(trainable, fix=lora.FIX)
for_loading = same_config


def merge(model: nn.Module, cfg: Config | None = None) -> None:
    """Dense layers holding dequantized NF4 + s * B A: a plain transformers model again."""
    lora.merge(model)  # replaces each quantized base by an nn.Linear with the merged weight
    warnings.warn("qlora: the adapter was trained against the 4-bit weights, so the merged model holds the "
                  "dequantized NF4 base plus the adapter; adding it to the original full-precision base instead "
                  "gives a different model", TuneforgeWarning, stacklevel=3)


def lora_form(model: nn.Module, cfg: Config) -> dict:
    """LoRA's (A, B, s) per layer, which apply to any copy of the base (with a warning: not the NF4 one)."""
    form = lora.lora_form(model, cfg.lora())
    warnings.warn("qlora: the adapter was trained against the 4-bit NF4 weights; on another copy of the base "
                  "(a GGUF's) it gives a slightly different model", TuneforgeWarning, stacklevel=3)
    return form


def file_config(model: nn.Module, cfg: Config) -> dict:
    """LoRA's keys only: block_size and the like would make PEFT warn about a config it cannot read
    (tuneforge keeps them in the weights file's metadata)."""
    return lora.file_config(model, cfg.lora())


def memory_report(model: nn.Module) -> dict:
    """Bytes the model holds, by kind (tied tensors counted once).

    - quantized_bytes: NF4 codes and scales of the quantized layers; quantized_weights: their weight
      count; bits_per_weight: 8 * quantized_bytes / quantized_weights (None when nothing is quantized);
      dense_bytes: what those weights took before, in their original dtype.
    - unquantized_bytes: every other base tensor (embeddings, head, norms, biases, buffers). They stay
      whole because the embedding is a lookup of one row per token (no matmul to speed up) and the head,
      often the same tied matrix, makes the logits, where 4-bit error lands directly on the output;
      norms are tiny and precision-sensitive.
    - adapter_bytes: LoRA's tensors; total_bytes: all of the above but dense_bytes.
    """
    quantized = [m for m in model.modules() if isinstance(m, NF4Linear)]
    codes = {id(t): t for m in quantized for t in (m.packed, m.absmax, m.absmax_scale, m.absmax_offset)
             if t is not None}
    adapter = {id(p): p for layer in lora.layers(model).values() for p in layer.adapter_params().values()}
    rest = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in codes and id(t) not in adapter}
    weights = sum(m.in_features * m.out_features for m in quantized)
    quantized_bytes, unquantized, adapter_bytes = (sum(t.numel() * t.element_size() for t in d.values())
                                                   for d in (codes, rest, adapter))
    return {"quantized_layers": len(quantized), "quantized_weights": weights, "quantized_bytes": quantized_bytes,
            "bits_per_weight": 8 * quantized_bytes / weights if weights else None,
            "dense_bytes": sum(m.in_features * m.out_features * m.weight_dtype.itemsize for m in quantized),
            "unquantized_bytes": unquantized, "adapter_bytes": adapter_bytes,
            "total_bytes": quantized_bytes + unquantized + adapter_bytes}
