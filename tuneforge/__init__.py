"""tuneforge: every established fine-tuning method for pretrained language models, side by side.

    model, tokenizer = tuneforge.load_model("smollm2-135m")
    lora = tuneforge.get_method("lora")
    lora.inject(model, lora.Config(r=16, lora_alpha=32, target_modules="all-linear"))
    ... train ...
    tuneforge.save_adapter(model, "out/adapter")
    base, _ = tuneforge.load_model("smollm2-135m")
    tuned = tuneforge.load_adapter(base, "out/adapter")
"""

from tuneforge.errors import UserError
from tuneforge.eval.generate import generate
from tuneforge.io.load import load_model
from tuneforge.io.peft_format import load_adapter, save_adapter
from tuneforge.methods import get_method


def train(cfg, resume: bool = False) -> dict:
    """Run a whole training run from a RunCfg (see tuneforge.config.from_yaml); returns its summary."""
    from tuneforge.train.run import run

    return run(cfg, resume=resume)


def evaluate(cfg, path: str, adapter: str | None = None) -> dict:
    """Metrics of ``cfg.model`` (with ``adapter``) on the file ``path``, as `tuneforge eval` prints them."""
    from tuneforge.eval.run import evaluate_file

    return evaluate_file(cfg, path, adapter=adapter)


__version__ = "0.1.0"
__all__ = ["UserError", "evaluate", "generate", "get_method", "load_adapter", "load_model", "save_adapter", "train"]
