"""Data: files to token examples (domain text, instructions, completions, classification).

``load_datasets(cfg.data, tokenizer, seed)`` reads the files, splits off a validation share when
no eval file is given (seeded, so every run sees the same split), builds examples in the chosen
format and counts everything it drops or truncates in ``Datasets.report``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tuneforge.data.classify import (ClassifyItem, answer_ids, classification_prompt, classify_examples, label_names,
                                     label_words, word_ids)
from tuneforge.data.collate import IGNORE, Collator, Example, length_grouped_batches
from tuneforge.data.instruct import supervised_examples
from tuneforge.data.readers import Row, read_rows, shuffled, split_rows
from tuneforge.data.text import text_splits
from tuneforge.errors import UserError

__all__ = ["IGNORE", "ClassifyItem", "Collator", "DataReport", "Datasets", "Example", "answer_ids",
           "classification_prompt", "length_grouped_batches", "load_datasets", "load_eval", "read_rows",
           "word_ids"]


@dataclass
class DataReport:
    """What became of one split's rows: counted, never silent."""

    rows: int  # rows (documents, for text) read into this split
    examples: int  # examples kept, after any max_examples cap
    dropped: int  # rows or examples left out: answer too long, score between thresholds, partial last block
    truncated: int  # examples cut to max_length and kept
    tokens: int  # tokens in the kept examples
    loss_tokens: int  # of those, the ones with a label (the loss is on these)

    def line(self) -> str:
        return (f"{self.rows} rows -> {self.examples} examples ({self.dropped} dropped, {self.truncated} truncated), "
                f"{self.tokens} tokens, {self.loss_tokens} in the loss")


@dataclass
class Datasets:
    train: list[Example]
    eval: list[Example]
    train_items: list[ClassifyItem] | None  # classification only, aligned with train
    eval_items: list[ClassifyItem] | None  # classification only, aligned with eval
    label_words: list[str] | None  # the verbalizer's answer words, in label order
    report: dict[str, DataReport]  # "train", "eval"

    def head(self, n: int) -> "Datasets":
        """The first ``n`` held-out examples (the split is already shuffled)."""
        items = None if self.eval_items is None else self.eval_items[:n]
        return dataclasses.replace(self, eval=self.eval[:n], eval_items=items)


def load_eval(cfg, tokenizer, seed: int = 0) -> Datasets:
    """Every row of ``cfg.eval_path`` as held-out data, with no training split (for evaluation)."""
    if not cfg.eval_path:
        raise UserError("no evaluation data file", "data.eval_path", fix="give the file to evaluate on")
    rows = read_rows(cfg.eval_path, cfg)
    if cfg.format == "text":
        return _text([], rows, cfg, tokenizer, seed)
    return _supervised([], shuffled(rows, seed), cfg, tokenizer)


def load_datasets(cfg, tokenizer, seed: int = 0) -> Datasets:
    """Examples for training and evaluation from ``cfg`` (a DataCfg)."""
    if not cfg.path:
        raise UserError("no training data file", "data.path", fix="set data.path to a .jsonl, .csv, .tsv or text file")
    if cfg.max_length < 2:
        raise UserError(f"max_length must be at least 2, got {cfg.max_length}", "data.max_length")
    rows = read_rows(cfg.path, cfg)
    eval_rows = read_rows(cfg.eval_path, cfg) if cfg.eval_path else None
    if cfg.format == "text":
        data = _text(rows, eval_rows, cfg, tokenizer, seed)
    else:
        if eval_rows is None:
            rows, eval_rows = split_rows(rows, cfg.val_fraction, seed)
        else:  # shuffled too, so that a cap takes a sample rather than a file's first rows
            rows, eval_rows = shuffled(rows, seed), shuffled(eval_rows, seed)
        data = _supervised(rows, eval_rows, cfg, tokenizer)
    if not data.train:
        raise UserError(f"no training examples are left ({data.report['train'].line()})", cfg.path,
                        fix="raise data.max_length, or check the format and columns")
    return data


def _capped(examples: list, items: list | None, cap: int | None) -> tuple[list, list | None]:
    if cap is None:
        return examples, items
    return examples[:cap], None if items is None else items[:cap]


def _report(rows: int, examples: list[Example], dropped: int, truncated: int) -> DataReport:
    return DataReport(rows=rows, examples=len(examples), dropped=dropped, truncated=truncated,
                      tokens=sum(len(e.input_ids) for e in examples),
                      loss_tokens=sum(t != IGNORE for e in examples for t in e.labels))


def _supervised(train_rows: list[Row], eval_rows: list[Row], cfg, tokenizer) -> Datasets:
    """The instruction, completion and classification formats: one split of rows at a time."""
    words, built = None, {}
    if cfg.format == "classification":
        names = label_names(train_rows + eval_rows, cfg)  # both files: a label only in eval still gets a word
        words = label_words(names, cfg.verbalizer)
    for split, rows, cap in (("train", train_rows, cfg.max_examples), ("eval", eval_rows, cfg.max_eval_examples)):
        if cfg.format == "classification":
            examples, items, dropped, truncated = classify_examples(rows, tokenizer, cfg, names)
        else:
            (examples, dropped, truncated), items = supervised_examples(rows, tokenizer, cfg), None
        examples, items = _capped(examples, items, cap)
        built[split] = (examples, items, _report(len(rows), examples, dropped, truncated))
    return Datasets(train=built["train"][0], eval=built["eval"][0], train_items=built["train"][1],
                    eval_items=built["eval"][1], label_words=words,
                    report={split: b[2] for split, b in built.items()})


def _text(rows: list[Row], eval_rows: list[Row] | None, cfg, tokenizer, seed: int) -> Datasets:
    caps = {"train": cfg.max_examples, "eval": cfg.max_eval_examples}
    out, report = {}, {}
    for split, (examples, docs, dropped) in text_splits(rows, eval_rows, cfg, tokenizer, seed).items():
        out[split] = _capped(examples, None, caps[split])[0]
        report[split] = _report(docs, out[split], dropped, 0)
    return Datasets(train=out["train"], eval=out["eval"], train_items=None, eval_items=None, label_words=None,
                    report=report)
