"""Features of the frozen model, cached on disk: a second fit, a sweep over C or a layer search
reads them instead of running the model again.

One .npy file per (model, texts, pooling, layer), named by the sha256 of what decides the features
but the layer: the model (the fingerprint of its every parameter, an injected method's too, its
dtype and any 4-bit codes), the pooling and the exact token ids (so the tokenizer and max_length). A layer search
extracts every layer in one pass and fills the cache for a later run at one of them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from torch import nn

from tuneforge.core.atomic import atomic_path
from tuneforge.core.cache import cache_dir as default_cache_dir
from tuneforge.model.fingerprint import fingerprint, tensor_hash
from tuneforge.methods import features
from tuneforge.quant.nf4 import NF4Linear


def _key(model: nn.Module, ids: list[list[int]], cfg: features.Config) -> str:
    digest = hashlib.sha256()
    head = {"model": fingerprint(model), "dtype": str(next(model.parameters()).dtype), "pooling": cfg.pooling}
    digest.update(json.dumps(head, sort_keys=True).encode())
    quantized = {f"{path}.{k}": t for path, m in model.named_modules() if isinstance(m, NF4Linear)
                 for k, t in m.state_dict().items()}  # 4-bit codes are buffers, which the fingerprint skips
    digest.update(tensor_hash(quantized).encode())
    for row in ids:
        digest.update(np.asarray(row, np.int64).tobytes() + b"|")
    return digest.hexdigest()


def extract(model: nn.Module, tokenizer, texts: list[str], cfg: features.Config, layers: list[int] | None = None,
            cache_dir=None) -> tuple[np.ndarray, bool]:
    """(features (len(layers), n, hidden), whether they all came from the cache) of ``texts`` at
    ``layers`` (default: those ``cfg`` asks for), under ``cache_dir`` (default: the tuneforge cache's
    features/ folder)."""
    layers = features.layers(model, cfg) if layers is None else layers
    ids = features.token_ids(tokenizer, list(texts), cfg)
    key = _key(model, ids, cfg)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "features"
    paths = [folder / f"{key}-layer{layer}.npy" for layer in layers]
    if all(path.is_file() for path in paths):
        return np.stack([np.load(path, allow_pickle=False) for path in paths]), True
    stack = features.extract(model, ids, layers, cfg, tokenizer.pad_token_id)
    for path, layer_features in zip(paths, stack):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # np.save on a path would append ".npy" to it
            np.save(f, layer_features, allow_pickle=False)
    return stack, False
