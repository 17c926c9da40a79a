"""A whole run, from a RunCfg to OUTPUT_DIR/final: load, inject, read data, train, save, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tuneforge import config as config_mod
from tuneforge.config import RunCfg
from tuneforge.errors import UserError
from tuneforge.io.atomic import atomic_path, write_text
from tuneforge.train import checkpoint
from tuneforge.train.loop import Evaluator, shuffled_batches, train


def make_evaluator(tokenizer, data, cfg: RunCfg) -> Evaluator | None:
    """Accuracy by label scoring for classification data, loss and perplexity otherwise."""
    from tuneforge.data import Collator, word_ids
    from tuneforge.eval.classify import classification_metrics, score_labels
    from tuneforge.eval.lm import evaluate_lm, perplexity

    if data.eval_items:
        answers = [word_ids(tokenizer, w, cfg.data.chat_template) for w in data.label_words]

        def run(model):
            scores = score_labels(model, [it.prompt_ids for it in data.eval_items], answers, cfg.eval.batch_size,
                                  tokenizer.pad_token_id)
            gold = torch.tensor([it.label for it in data.eval_items])
            m = classification_metrics(scores.argmax(1).tolist(), gold.tolist(), len(data.label_words))
            # The held-out loss comes from the same forward pass: the gold label word's negative
            # log-likelihood, averaged over its tokens.
            lengths = torch.tensor([len(a) for a in answers], dtype=torch.float32)
            loss = (-scores[torch.arange(len(gold)), gold] / lengths[gold]).mean().item()
            return {"loss": loss, "perplexity": perplexity(loss), **m.as_dict()}

        return Evaluator(run, metric="accuracy", higher_is_better=True)
    if data.eval:
        return Evaluator(lambda model: evaluate_lm(model, data.eval, Collator(tokenizer.pad_token_id),
                                                   cfg.eval.batch_size))
    return None


def run(cfg: RunCfg, resume: bool = False, progress: bool = True) -> dict:
    """Train as ``cfg`` says; returns the summary also written to OUTPUT_DIR/summary.json."""
    from tuneforge.data import Collator, length_grouped_batches, load_datasets
    from tuneforge.io.load import load_model
    from tuneforge.methods import get_method, parameter_count

    out = Path(cfg.train.output_dir)
    done = checkpoint.complete(out / "checkpoints")
    if resume and not done:
        raise UserError("there is no checkpoint to resume from", str(out / "checkpoints"), fix="run without --resume")
    if not resume and done:
        raise UserError("this output folder already holds a run", str(out),
                        fix="continue it with --resume, or set train.output_dir to a new folder")
    method = get_method(cfg.method.name)
    own_run = getattr(method, "run", None)  # a method not trained by the loop (features) runs itself
    if own_run is not None:
        return own_run(cfg, progress=progress)
    method_cfg = config_mod.method_config(cfg)
    model, tokenizer = load_model(cfg.model, dtype="float32", device=cfg.train.device)
    data = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    if not data.train:
        raise UserError("no training examples left after reading and filtering", cfg.data.path,
                        fix="check data.format, the columns and max_length")
    config_mod.save(cfg, out / "config.yaml")
    _print_estimate(cfg, data)
    torch.manual_seed(cfg.train.seed)
    method.inject(model, method_cfg)
    params = method.trainable(model)
    total = parameter_count(model)
    n_train = sum(p.numel() for p in params.values())
    print(f"tuneforge: {cfg.method.name}: {n_train:,} trainable parameters of {total:,} "
          f"({100 * n_train / total:.3f}%); {len(data.train)} training examples, {len(data.eval)} held out",
          file=sys.stderr)
    for split, report in data.report.items():
        if report.truncated or report.dropped:
            print(f"tuneforge: {split}: {report.truncated} truncated to {cfg.data.max_length} tokens, "
                  f"{report.dropped} dropped", file=sys.stderr)

    evaluator = make_evaluator(tokenizer, data, cfg)
    if cfg.data.packing:  # batches of similar length waste little on padding
        lengths = [len(e.input_ids) for e in data.train]
        order = lambda epoch: length_grouped_batches(lengths, cfg.train.batch_size, cfg.train.seed, epoch)  # noqa: E731
    else:
        order = shuffled_batches(len(data.train), cfg.train.batch_size, cfg.train.seed)
    summary = train(model, params, data.train, Collator(tokenizer.pad_token_id), cfg.train, out,
                    batch_order=order, evaluator=evaluator, resume=resume, progress=progress)

    save = getattr(method, "save", None)
    if save is not None:
        save(model, tokenizer, out / "final")
    else:
        from tuneforge.io.peft_format import save_adapter

        save_adapter(model, out / "final", base_model_name=cfg.model)
    artifact = sum(f.stat().st_size for f in (out / "final").rglob("*") if f.is_file())
    result = {"method": cfg.method.name, "trainable_parameters": n_train, "total_parameters": total,
              "artifact_bytes": artifact,
              "train_examples": len(data.train), "eval_examples": len(data.eval),
              # "after" is the weights the run saved; "best" an earlier evaluation that scored higher, if any
              "before": _numbers(summary.first_eval) or None,
              "after": _numbers(summary.final_eval or summary.best_eval),  # best: a resumed run with no steps left
              **summary.as_dict()}
    if summary.final_eval and summary.best_eval.get("step") != summary.final_eval.get("step"):
        result["best"] = _numbers(summary.best_eval)
    for key in ("best_eval", "first_eval", "final_eval"):
        result.pop(key)
    write_text(out / "summary.json", json.dumps(result, indent=1))
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    return result


def _print_estimate(cfg: RunCfg, data) -> None:
    from tuneforge.estimate import estimate

    report = data.report["train"]
    est = estimate(cfg, tokens_per_example=report.tokens / max(report.examples, 1),
                   loss_tokens_per_example=report.loss_tokens / max(report.examples, 1), n_examples=len(data.train))
    print(f"tuneforge: {est.describe()}", file=sys.stderr)


def _numbers(metrics: dict | None) -> dict | None:
    """The figures of an evaluation for the summary: its numbers and the accuracy's interval."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or k == "accuracy_ci95"}


def plot_losses(metrics_path: Path, png: Path) -> None:
    """Training and validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    eval_pts = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train_pts, "train"), (eval_pts, "validation")):
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
