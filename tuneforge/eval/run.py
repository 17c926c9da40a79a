"""Evaluate a model (optionally with an adapter) on one file, as `tuneforge eval` does."""

from __future__ import annotations

import dataclasses

from tuneforge.config import RunCfg


def evaluate_file(cfg: RunCfg, path: str, adapter: str | None = None, force: bool = False,
                  held_out: bool = False) -> dict:
    """Loss and perplexity on ``path``; for classification data also accuracy, macro-F1 and the
    confusion matrix (``confusion``, and ``confusion_table`` as text). ``held_out``: only the part of
    ``path`` a training run with ``cfg`` holds out, split as training splits it."""
    from tuneforge.data import load_datasets, load_eval
    from tuneforge.eval.classify import format_confusion
    from tuneforge.io.load import load_model
    from tuneforge.train.run import make_evaluator

    # fp32 for a run's held-out split, as training loads and evaluates the model
    model, tokenizer = load_model(cfg.model, dtype="float32" if held_out else "auto", device=cfg.train.device)
    if adapter:
        from tuneforge.io.peft_format import load_adapter

        model = load_adapter(model, adapter, force=force)
    if held_out:  # what the run held out: data.eval_path if it has one, else its split of the file
        data = load_datasets(dataclasses.replace(cfg.data, path=path), tokenizer, seed=cfg.train.seed)
    else:
        data = load_eval(dataclasses.replace(cfg.data, eval_path=path), tokenizer)
        if cfg.eval.max_examples is not None:
            data = data.head(cfg.eval.max_examples)
    evaluator = make_evaluator(tokenizer, data, cfg)
    metrics = evaluator.run(model)
    metrics["n"] = len(data.eval_items) if data.eval_items else len(data.eval)
    if data.eval_items:
        metrics["labels"] = data.label_words
        metrics["confusion_table"] = format_confusion(metrics["confusion"], data.label_words)
    return metrics
