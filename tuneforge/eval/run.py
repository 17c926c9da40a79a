"""Evaluate a model (optionally with an adapter) on one file, as `tuneforge eval` does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from tuneforge.core.config import RunCfg
from tuneforge.data import load_datasets, load_eval
from tuneforge.core.errors import UserError
from tuneforge.eval.classify import format_confusion, metrics_from_confusion
from tuneforge.eval.evaluator import make_evaluator
from tuneforge.eval.lm import perplexity
from tuneforge.io.load import load_model
from tuneforge.io.peft_format import load_adapter
from tuneforge.methods._shared import Injected


def evaluate_file(cfg: RunCfg, path: str, adapter: str | None = None, force: bool = False,
                  held_out: bool = False, unseen: bool = False) -> dict:
    """Loss and perplexity on ``path``; for classification data also accuracy, macro-F1 and the
    confusion matrix (``confusion``, and ``confusion_table`` as text), with the accuracy's 95%
    interval (``accuracy_ci95``).

    ``held_out``: only the part of ``path`` a training run with ``cfg`` holds out, split as training
    splits it. ``unseen``: every classification row such a run never trained on, its whole held-out
    split and the training rows beyond ``data.max_examples``; ``parts`` gives each part's figures.
    ``adapter`` is any adapter folder, a feature classifier's too.
    """
    if held_out and unseen:
        raise UserError("--held-out and --unseen choose different rows", "eval", fix="give one of them")
    if unseen:
        check_unseen(cfg)
    # fp32 for a run's own rows, as training loads and evaluates the model
    run_rows = held_out or unseen
    model, tokenizer = load_model(cfg.model, dtype="float32" if run_rows else "auto", device=cfg.train.device,
                                  allow_pickle=cfg.allow_pickle)
    loaded = load_adapter(model, adapter, force=force) if adapter else None
    probe = None if loaded is None or isinstance(loaded, Injected) else loaded
    if probe is not None and cfg.data.format != "classification":
        raise UserError("a feature classifier scores classification data", "data.format",
                        fix="set data.format: classification (give the run's --config)")
    if unseen:
        metrics = evaluate_unseen(model, tokenizer, cfg, path, probe)
        labels = metrics["labels"]
    else:
        if held_out:  # what the run held out: data.eval_path if it has one, else its split of the file
            data = load_datasets(dataclasses.replace(cfg.data, path=path), tokenizer, seed=cfg.train.seed)
        else:
            data = load_eval(dataclasses.replace(cfg.data, eval_path=path), tokenizer)
            if cfg.eval.max_examples is not None:
                data = data.head(cfg.eval.max_examples)
        evaluator = make_evaluator(tokenizer, data, cfg, probe)
        if evaluator is None:
            raise UserError(f"nothing to score: as {cfg.data.format} data the file gives no example (a text shorter "
                            f"than one block of data.max_length {cfg.data.max_length} tokens, or every row dropped)",
                            path, fix="give the run's --config or --set data.format, or a longer file")
        metrics = evaluator.run(model)
        metrics["n"] = len(data.eval_items) if data.eval_items else len(data.eval)
        labels = data.label_words
    if "confusion" in metrics:
        metrics["labels"] = labels
        metrics["confusion_table"] = format_confusion(metrics["confusion"], labels)
    return metrics


def run_config(result_dir: str | None) -> Path | None:
    """The config.yaml of the run that wrote ``result_dir`` (its final/: an adapter, a feature classifier or
    full fine-tuning's model), which says how that run read its data; None for a folder that no run wrote."""
    if result_dir is None:
        return None
    path = Path(result_dir).expanduser().resolve()
    found = path.parent / "config.yaml"
    return found if path.is_dir() and found.is_file() else None


def evaluate_unseen(model, tokenizer, cfg: RunCfg, path: str, probe=None) -> dict:
    """Figures on every row of ``path`` a run with ``cfg`` never trains on (``unseen_parts``), the
    parts scored separately and combined; ``parts`` holds each part's own figures."""
    parts = unseen_parts(cfg, path, tokenizer)
    scored = {name: make_evaluator(tokenizer, part, cfg, probe).run(model) for name, part in parts.items()
              if part.eval}
    if not scored:
        raise UserError("a run with this config trains on every row of the file: none is unseen", path,
                        fix="set data.val_fraction or data.max_examples")
    return {**combined(scored), "labels": parts["held_out"].label_words}


def check_unseen(cfg: RunCfg) -> None:
    """Refuse, before any model is loaded, a config whose run leaves no classification row unseen."""
    if cfg.data.format != "classification":
        raise UserError(f"--unseen scores classification rows, and this data's format is {cfg.data.format!r}",
                        "data.format", fix="give the run's --config, or use --held-out for this data")
    if not cfg.data.eval_path and cfg.data.val_fraction <= 0 and cfg.data.max_examples is None:
        raise UserError("a run with this config trains on every row of the file: none is unseen",
                        "data.val_fraction", fix="set data.val_fraction or data.max_examples")


def unseen_parts(cfg: RunCfg, path: str, tokenizer) -> dict:
    """The rows a run with ``cfg`` and ``path`` as its training file never trains on, as two
    evaluation sets: its whole held-out split ("held_out", uncapped: ``data.eval_path`` if set,
    else split off ``path``) and its training rows past ``data.max_examples``
    ("unused_training"), each split and ordered exactly as training splits them. A run stopped
    early (``max_steps``) saw fewer rows still; those are not counted here."""
    check_unseen(cfg)
    data_cfg = dataclasses.replace(cfg.data, path=path, max_examples=None, max_eval_examples=None)
    full = load_datasets(data_cfg, tokenizer, seed=cfg.train.seed)
    cap = cfg.data.max_examples if cfg.data.max_examples is not None else len(full.train)
    held = dataclasses.replace(full, train=[], train_items=[])
    unused = dataclasses.replace(full, train=[], train_items=[], eval=full.train[cap:],
                                 eval_items=full.train_items[cap:])
    return {"held_out": held, "unused_training": unused}


def combined(scored: dict[str, dict]) -> dict:
    """One set of figures from parts scored separately: confusion matrices add, losses weigh by size."""
    total = metrics_from_confusion(np.sum([m["confusion"] for m in scored.values()], axis=0).tolist())
    loss = sum(m["loss"] * m["n"] for m in scored.values()) / total.n
    parts = {name: {k: m[k] for k in ("accuracy", "accuracy_ci95", "macro_f1", "loss", "n")}
             for name, m in scored.items()}
    return {"loss": loss, "perplexity": perplexity(loss), **total.as_dict(), "parts": parts}
