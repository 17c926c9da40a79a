"""Standalone models: an adapter folded into its base, written as a Hugging Face directory."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tuneforge.errors import UserError
from tuneforge.io.atomic import atomic_dir


def merge_adapter(model_spec: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto",
                  force: bool = False) -> Path:
    """Load the base, apply the adapter, fold it in, and save a model directory that transformers
    loads without tuneforge. A method whose math cannot be folded (bottleneck adapters, virtual
    tokens) raises a UserError that says so."""
    from tuneforge.io.load import load_model, resolve_dtype
    from tuneforge.io.peft_format import load_adapter
    from tuneforge.methods import REGISTRY

    model, tokenizer = load_model(model_spec, dtype="float32", device="cpu")
    load_adapter(model, adapter_dir, force=force)
    name, _ = model.tuneforge_method
    REGISTRY[name].merge(model)
    model.tuneforge_method = None
    target = resolve_dtype(dtype if dtype != "auto" else "float32")
    model.to(target)
    if target != torch.float32:
        print(f"tuneforge: merged weights saved as {target}", file=sys.stderr)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise UserError("the output folder exists and is not a model directory", str(out_dir),
                        fix="choose a new folder for --out")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
