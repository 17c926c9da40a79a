"""The reference model of DPO and KTO: the model the training starts from, at no second copy.

- ``switched_off``: a method that adds tensors (LoRA, QLoRA, IA3, adapters, prefix and prompt tuning)
  is switched off for the reference's forward (``Injected.disabled``): the base, computed under
  ``no_grad`` in the same step.
- ``ahead``: full fine-tuning changes the base itself, so the reference's log-probabilities of every
  example are computed once, before the first step, and kept with the examples. They are cached as
  safetensors under the tuneforge cache, keyed to the base's fingerprint and the examples' tokens, so
  a second run (or a resumed one) reads them instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.core.atomic import atomic_path
from tuneforge.core.cache import cache_dir
from tuneforge.model.fingerprint import fingerprint
from tuneforge.training.objectives import Reference, sequence_logprobs


def switched_off(model: nn.Module, injected) -> Reference:
    """The reference as ``model`` with ``injected``'s method off (``model``: the module itself, not a
    DDP wrapper)."""

    def reference(batch: dict, share: bool) -> torch.Tensor:
        with torch.no_grad(), injected.disabled(model):
            logps, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         share, None, groups=2)
        return logps

    return reference


def from_batch(batch: dict, share: bool) -> torch.Tensor:
    """The log-probabilities ``ahead`` put with the examples."""
    return batch["reference"]


def ahead(model: nn.Module, examples: list, collate, batch_size: int) -> list:
    """``examples`` with their ``reference`` log-probabilities (each example's two rows) under ``model``
    as it is now, read from the cache when this base and these examples were computed before."""
    if not examples:
        return examples
    digest = hashlib.sha256(json.dumps(fingerprint(model), sort_keys=True).encode())
    for e in examples:
        for row in e.rows():
            digest.update(json.dumps([row.input_ids, row.labels]).encode())
    path = cache_dir() / "reference" / f"{digest.hexdigest()}.safetensors"
    if path.is_file():
        values = load_file(str(path))["logps"]
    else:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        parts = []
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
                logps, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                             True, None, groups=2)
                parts.append(logps.view(2, -1).T.cpu())  # (n, 2): each example's first row, then its second
        model.train(was_training)
        values = torch.cat(parts)
        with atomic_path(path) as tmp:
            save_file({"logps": values.contiguous()}, str(tmp))
    return [dataclasses.replace(e, reference=(float(a), float(b))) for e, (a, b) in zip(examples, values.tolist())]
