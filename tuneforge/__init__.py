"""tuneforge: every established fine-tuning method for pretrained language models, side by side.

    model, tokenizer = tuneforge.load_model("smollm2-135m")
    lora = tuneforge.get_method("lora")
    adapter = lora.inject(model, lora.Config(r=16, lora_alpha=32, target_modules="all-linear"))
    ... train: tuneforge.train(cfg, model=model, tokenizer=tokenizer, injected=adapter) ...
    tuneforge.save_adapter(model, adapter, "out/adapter")
    base, _ = tuneforge.load_model("smollm2-135m")
    tuneforge.load_adapter(base, "out/adapter")

The API loads on first use: ``import tuneforge`` imports neither torch nor transformers, so
``tuneforge --help`` and ``tuneforge config`` answer at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tuneforge.core.errors import UserError

__version__ = "0.1.0"

# public name -> (module, attribute), imported when first used
_API = {
    "load_model": ("tuneforge.io.load", "load_model"),
    "get_method": ("tuneforge.methods.registry", "get_method"),
    "save_adapter": ("tuneforge.io.peft_format", "save_adapter"),
    "load_adapter": ("tuneforge.io.peft_format", "load_adapter"),
    "save_model": ("tuneforge.io.export", "save_model"),
    "generate": ("tuneforge.eval.generate", "generate"),
    "evaluate": ("tuneforge.eval.run", "evaluate_file"),
    "train": ("tuneforge.training.run", "run"),
}

if TYPE_CHECKING:
    from tuneforge.eval.generate import generate
    from tuneforge.eval.run import evaluate_file as evaluate
    from tuneforge.io.export import save_model
    from tuneforge.io.load import load_model
    from tuneforge.io.peft_format import load_adapter, save_adapter
    from tuneforge.methods.registry import get_method
    from tuneforge.training.run import run as train


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'tuneforge' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["UserError", "evaluate", "generate", "get_method", "load_adapter", "load_model", "save_adapter",
           "save_model", "train"]
