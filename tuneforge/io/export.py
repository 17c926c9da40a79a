"""Standalone models: a whole model (full fine-tuning's result) or an adapter folded into its base,
written as a Hugging Face directory that transformers loads without tuneforge."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from tuneforge.atomic import atomic_dir
from tuneforge.devices import resolve_dtype
from tuneforge.errors import UserError
from tuneforge.io.load import load_model
from tuneforge.io.peft_format import load_adapter
from tuneforge.methods._shared import Injected


def save_model(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """A Hugging Face model directory (safetensors, config, tokenizer), written atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def merge_adapter(model_spec: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto",
                  force: bool = False, allow_pickle: bool = False) -> Path:
    """Load the base, apply the adapter, fold it in, and save a model directory that transformers
    loads without tuneforge. A method whose math cannot be folded (bottleneck adapters, virtual
    tokens, a feature classifier) raises a UserError that says so."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise UserError("the output folder exists and is not a model directory", str(out_dir),
                        fix="choose a new folder for --out")
    model, tokenizer = load_model(model_spec, dtype="float32", device="cpu", allow_pickle=allow_pickle)
    loaded = load_adapter(model, adapter_dir, force=force)
    if not isinstance(loaded, Injected):
        raise UserError("a feature classifier reads the model's hidden states; there are no weights to merge",
                        str(adapter_dir), fix="use it with tuneforge eval --adapter")
    loaded.merge(model)
    target = resolve_dtype(dtype if dtype != "auto" else "float32")
    model.to(target)
    if target != torch.float32:
        print(f"tuneforge: merged weights saved as {target}", file=sys.stderr)
    return save_model(model, tokenizer, out_dir)
