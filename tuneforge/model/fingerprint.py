"""A short description of a model's weights, saved with every adapter, so that loading the adapter
onto another base (or onto the model it was already merged into) fails with a clear message instead
of producing garbage.

The hash covers every parameter cheaply: its name, its shape and 4,096 values at evenly spaced
positions (all of them in a smaller tensor), read as bfloat16, so that a base loaded in float32 or
in bfloat16 gives the same fingerprint, while any trained or merged weight matrix, whose values
change everywhere, gives another. A method records the fingerprint of the base before it changes
it (``Injected.base``), so an adapter's record names the model it must be loaded onto.

``tensor_hash`` is the sha256 of a state dict's every byte: an adapter records it, and a file whose
tensors were damaged after saving is refused on load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from tuneforge.core.errors import UserError

SAMPLES = 4096
VERSION = 2
COMPARED = ("architecture", "model_type", "hidden_size", "num_layers", "vocab_size", "sha256")


def _sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    if flat.numel() > SAMPLES:
        index = torch.arange(SAMPLES, device=flat.device) * (flat.numel() - 1) // (SAMPLES - 1)  # exact, in int64
        flat = flat[index]
    return flat.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()


def fingerprint(model: nn.Module) -> dict:
    """Architecture, sizes and a short sha256 over a sample of every parameter (tied ones once)."""
    cfg = model.config
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():  # model order; a tied tensor is listed once
            digest.update(f"{name}:{tuple(p.shape)}|".encode() + _sample(p))
    return {"version": VERSION, "name": Path(getattr(cfg, "name_or_path", "") or "").name or None,  # for messages
            "architecture": type(model).__name__, "model_type": getattr(cfg, "model_type", None),
            "hidden_size": getattr(cfg, "hidden_size", None), "num_layers": getattr(cfg, "num_hidden_layers", None),
            "vocab_size": getattr(cfg, "vocab_size", None), "sha256": digest.hexdigest()[:16]}


def describe(fp: dict) -> str:
    return (f"{fp.get('name') or 'a model'} ({fp.get('architecture')}, {fp.get('num_layers')} layers, hidden "
            f"{fp.get('hidden_size')}, vocab {fp.get('vocab_size')}, weights {fp.get('sha256')})")


def check(saved: dict, model: nn.Module, force: bool = False, where: str | None = None) -> None:
    """Raise a UserError naming both bases unless ``model`` is the base ``saved`` was made on (or ``force``).
    A record older than this fingerprint's version is checked by shape only."""
    current = fingerprint(model)
    compared = COMPARED if saved.get("version") == VERSION else COMPARED[:-1]
    differ = [k for k in compared if saved.get(k) != current.get(k)]
    if differ and not force:
        raise UserError(f"this adapter was made for {describe(saved)}, but the model is {describe(current)} "
                        f"(they differ in {', '.join(differ)})", where,
                        fix="load the base the adapter was trained on (not one it was merged into), or pass "
                            "--force to load it anyway")


def tensor_hash(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().to("cpu").contiguous()
        head = f"{name}:{t.dtype}:{tuple(t.shape)}|".encode()
        digest.update(head + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
