"""Data: files to token examples (domain text, instructions, completions, classification).

``load_datasets(cfg.data, tokenizer, seed)`` reads the files, splits off a validation share when
no eval file is given (seeded, so every run sees the same split), builds examples in the chosen
format and counts everything it drops or truncates in ``Datasets.report``.

``data.path`` may also be a list of sources, mixed by weight (``mixture_counts``): each source is
read, split and built into examples with its own format and columns, exactly as a run on that one
file would be, and then each split takes from every source its share of the largest mixture that
keeps the weights without repeating an example.

An example split off for validation that is also a training example (a file with duplicate rows; for
classification, a text also trained on under any label) is not held out: it would measure memory,
not generalisation. The eval report counts those dropped. An explicit ``data.eval_path`` is taken as
it is.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from tuneforge.data.classify import (ClassifyItem, answer_ids, classification_prompt, classify_examples, label_names,
                                     label_words, word_ids)
from tuneforge.data.collate import IGNORE, Collator, Example, length_grouped_batches
from tuneforge.data.instruct import supervised_examples
from tuneforge.data.preference import preference_examples
from tuneforge.data.readers import Row, file_kind, read_rows, shuffled, sources, split_rows
from tuneforge.data.text import text_splits
from tuneforge.core.errors import UserError

__all__ = ["IGNORE", "ClassifyItem", "Collator", "DataReport", "Datasets", "Example", "answer_ids",
           "classification_prompt", "length_grouped_batches", "load_datasets", "load_eval", "mixture_counts",
           "read_rows", "word_ids"]

SUPERVISED_MIX = {"instruction", "completion"}  # formats whose examples are alike: prompt, then the answer


@dataclass
class DataReport:
    """What became of one split's rows: counted, never silent."""

    rows: int  # rows (documents, for text) read into this split
    examples: int  # examples kept, after any max_examples cap
    dropped: int  # rows or examples left out (dropped_why says why)
    truncated: int  # examples cut to max_length and kept
    tokens: int  # tokens in the kept examples
    loss_tokens: int  # of those, the ones with a label (the loss is on these)
    sources: dict[str, int] = field(default_factory=dict)  # a mixture: each source's examples in this split
    left_out: int = 0  # a mixture: the sources' examples the weights left out (none is repeated)
    dropped_why: dict[str, int] = field(default_factory=dict)  # the dropped, by reason

    def dropped_line(self) -> str:
        """"N dropped", with how many for each reason."""
        why = ", ".join(f"{n} {reason}" for reason, n in self.dropped_why.items())
        return f"{self.dropped} dropped" + (f" ({why})" if why else "")

    def line(self) -> str:
        text = (f"{self.rows} rows -> {self.examples} examples ({self.dropped_line()}, {self.truncated} truncated), "
                f"{self.tokens} tokens, {self.loss_tokens} in the loss")
        if self.sources:
            text += "; from " + ", ".join(f"{name} {n}" for name, n in self.sources.items())
            text += f" ({self.left_out} left out to keep the weights)" if self.left_out else ""
        return text


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
    """Every row of ``cfg.eval_path`` as held-out data, with no training split (for evaluation): the file a
    user names is scored whole, whatever cap (``max_eval_examples``) a run puts on its own held-out rows."""
    if not cfg.eval_path:
        raise UserError("no evaluation data file", "data.eval_path", fix="give the file to evaluate on")
    cfg = dataclasses.replace(cfg, max_eval_examples=None)
    rows = read_rows(cfg.eval_path, cfg)
    if cfg.format == "text":
        return _text([], rows, cfg, tokenizer, seed)
    return _supervised([], shuffled(rows, seed), cfg, tokenizer)


def load_datasets(cfg, tokenizer, seed: int = 0) -> Datasets:
    """Examples for training and evaluation from ``cfg`` (a DataCfg)."""
    if not cfg.path:
        raise UserError("no training data file", "data.path",
                        fix="set data.path to a .jsonl, .json, .csv, .tsv, .parquet, .arrow or text file, a `datasets` "
                            "folder, or a list of them")
    if cfg.max_length < 2:
        raise UserError(f"max_length must be at least 2, got {cfg.max_length}", "data.max_length")
    if isinstance(cfg.path, (list, tuple)):
        return _mixture(cfg, tokenizer, seed)
    rows = read_rows(cfg.path, cfg)
    eval_rows = read_rows(cfg.eval_path, cfg) if cfg.eval_path else None
    if cfg.format == "text":
        _check_documents(rows, cfg.path, cfg)
        _check_documents(eval_rows or [], cfg.eval_path, cfg)
        data = _text(rows, eval_rows, cfg, tokenizer, seed)
    else:
        split = eval_rows is None
        if split:
            rows, eval_rows = split_rows(rows, cfg.val_fraction, seed)
        else:  # shuffled too, so that a cap takes a sample rather than a file's first rows
            rows, eval_rows = shuffled(rows, seed), shuffled(eval_rows, seed)
        data = _supervised(rows, eval_rows, cfg, tokenizer, unseen_only=split)
    if not data.train:
        _no_examples(data.report["train"], cfg.path, cfg)
    return data


SEEN = "also a training example"  # dropped from a split-off validation share


def example_keys(examples: list, items: list[ClassifyItem] | None) -> list[int]:
    """A hash of what the model is shown of each example: a classification row's prompt (its text,
    under any label), else the tokens of every row the example makes."""
    if items is not None:
        return [hash(tuple(item.prompt_ids)) for item in items]
    return [hash(tuple(tuple(row.input_ids) for row in example.rows())) for example in examples]


def unseen(trained: set[int], examples: list, items: list | None) -> tuple[list, list | None, int]:
    """(the examples not in ``trained``, their items, how many were dropped)."""
    keep = [k for k, key in enumerate(example_keys(examples, items)) if key not in trained]
    return [examples[k] for k in keep], None if items is None else [items[k] for k in keep], len(examples) - len(keep)


def _check_documents(rows: list[Row], path, cfg) -> None:
    """``format: text`` on a file of rows reads one column as documents: say so when it has no such column."""
    if rows and cfg.text_column not in rows[0] and file_kind(path) != "text":
        columns = ", ".join(name if len(name) <= 24 else name[:23] + "…" for name in map(str, rows[0]))
        raise UserError(f"this file is a table (columns: {columns}), and data.format: text reads its "
                        f"'{cfg.text_column}' column as documents, which it does not have", str(path),
                        fix="set data.format (instruction, completion or classification) for rows of examples, or "
                            "data.text_column to the column that holds the text (data.columns for a file without a "
                            "header row)")


def _no_examples(report: DataReport, path, cfg) -> None:
    """No training example is left: say why, for the format at hand."""
    fix = "raise data.max_length, or check the format and columns"
    if cfg.format == "text":
        fix = f"lower data.max_length (a block is {cfg.max_length} tokens), or give more text"
        if file_kind(path) != "text":
            fix = (f"this file is a table of {report.rows} rows, read as one stream of text (data.format: text): set "
                   "data.format (instruction, completion or classification) for rows of examples, or " + fix)
    raise UserError(f"no training examples are left ({report.line()})", str(path), fix=fix)


def _capped(examples: list, items: list | None, cap: int | None) -> tuple[list, list | None]:
    if cap is None:
        return examples, items
    return examples[:cap], None if items is None else items[:cap]


PARTIAL = "a partial last block"  # raw text: what is left after the last full block


def _report(rows: int, examples: list[Example], dropped: Counter, truncated: int) -> DataReport:
    return DataReport(rows=rows, examples=len(examples), dropped=sum(dropped.values()), truncated=truncated,
                      tokens=sum(len(r.input_ids) for e in examples for r in e.rows()),
                      loss_tokens=sum(t != IGNORE for e in examples for r in e.rows() for t in r.labels),
                      dropped_why={reason: n for reason, n in dropped.items() if n})


def _partial(dropped: int) -> Counter:
    return Counter({PARTIAL: dropped})


def _examples(rows: list[Row], cfg, tokenizer, names: list[str] | None) -> tuple[list, list | None, Counter, int]:
    """(examples, items or None, dropped, truncated) of supervised rows, in ``cfg``'s format."""
    if cfg.format == "classification":
        return classify_examples(rows, tokenizer, cfg, names)
    if cfg.format == "preference":
        examples, dropped, truncated = preference_examples(rows, tokenizer, cfg)
        return examples, None, dropped, truncated
    examples, dropped, truncated = supervised_examples(rows, tokenizer, cfg)
    return examples, None, dropped, truncated


def _supervised(train_rows: list[Row], eval_rows: list[Row], cfg, tokenizer, unseen_only: bool = False) -> Datasets:
    """The instruction, completion and classification formats: one split of rows at a time.
    ``unseen_only``: the eval rows were split off the training file, so they keep no training example."""
    words, names, built = None, None, {}
    if cfg.format == "classification":
        names = label_names(train_rows + eval_rows, cfg)  # both files: a label only in eval still gets a word
        words = label_words(names, cfg.verbalizer)
    for split, rows, cap in (("train", train_rows, cfg.max_examples), ("eval", eval_rows, cfg.max_eval_examples)):
        examples, items, dropped, truncated = _examples(rows, cfg, tokenizer, names)
        if split == "eval" and unseen_only:
            trained = set(example_keys(built["train"][0], built["train"][1]))
            examples, items, dropped[SEEN] = unseen(trained, examples, items)
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
        report[split] = _report(docs, out[split], _partial(dropped), 0)
    return Datasets(train=out["train"], eval=out["eval"], train_items=None, eval_items=None, label_words=None,
                    report=report)


# --- mixtures: data.path as a list of sources ---

def mixture_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """How many examples a mixture takes from each source: the largest mixture whose shares are the
    weights (``w_i / sum(w)``) and that repeats no example. The scarcest source, relative to its
    share, gives all it has; source i gives ``floor(share_i * N)``, ``N = min_j size_j / share_j``.

        mixture_counts([100, 1000], [1, 1]) == [100, 100]
        mixture_counts([100, 1000], [1, 3]) == [100, 300]
    """
    shares = [w / sum(weights) for w in weights]
    total = min(size / share for size, share in zip(sizes, shares))
    return [min(size, int(share * total + 1e-9)) for size, share in zip(sizes, shares)]


@dataclass
class _Part:
    """One source's share of one split, before mixing: its examples in order, and its counts."""

    examples: list[Example]
    items: list[ClassifyItem] | None
    rows: int
    dropped: Counter
    truncated: int


def _mixture(cfg, tokenizer, seed: int) -> Datasets:
    """Each source read, split and built on its own (as a run on that one file would), then every
    split mixed by weight. With ``data.eval_path`` nothing is split off the sources and the eval file
    (read with data's own format and columns) is the held-out set."""
    mixed = sources(cfg)
    for source in mixed:
        if source.cfg.format != cfg.format and not {source.cfg.format, cfg.format} <= SUPERVISED_MIX:
            raise UserError(f"source {source.name} has format {source.cfg.format}, and data.format is {cfg.format}",
                            "data.path", fix="only instruction and completion sources mix; give the sources one format")
    rows = []
    for source in mixed:
        read = read_rows(source.cfg.path, source.cfg)
        rows.append(shuffled(read, seed)[:source.max_rows] if source.max_rows else read)
    eval_rows = read_rows(cfg.eval_path, cfg) if cfg.eval_path else None
    build = _text_parts if cfg.format == "text" else _supervised_parts
    parts, words = build(mixed, rows, eval_rows, cfg, tokenizer, seed)
    for source, part in zip(mixed, parts["train"]):
        if not part.examples:
            _no_examples(_report(part.rows, [], part.dropped, part.truncated), source.cfg.path, source.cfg)
    names = [s.name for s in mixed]
    weights = [s.weight for s in mixed]
    train = _mix(parts["train"], names, weights, cfg.max_examples, seed)
    held = _mix(parts["eval"], names, weights if eval_rows is None else None, cfg.max_eval_examples, seed)
    return Datasets(train=train[0], eval=held[0], train_items=train[1], eval_items=held[1], label_words=words,
                    report={"train": train[2], "eval": held[2]})


def _text_parts(mixed: list, rows: list[list[Row]], eval_rows: list[Row] | None, cfg, tokenizer, seed: int
                ) -> tuple[dict[str, list[_Part]], None]:
    """Each text source cut into blocks and split as on its own; an eval file is all held out."""
    parts = {"train": [], "eval": []}
    for source, source_rows in zip(mixed, rows):
        _check_documents(source_rows, source.cfg.path, source.cfg)
        held = None if eval_rows is None else []  # an eval file: the source is all training text
        for split, (examples, docs, dropped) in text_splits(source_rows, held, source.cfg, tokenizer, seed).items():
            parts[split].append(_Part(examples, None, docs, _partial(dropped), 0))
    if eval_rows is not None:
        _check_documents(eval_rows, cfg.eval_path, cfg)
        examples, docs, dropped = text_splits([], eval_rows, cfg, tokenizer, seed)["eval"]
        parts["eval"] = [_Part(examples, None, docs, _partial(dropped), 0)]
    return parts, None


def _supervised_parts(mixed: list, rows: list[list[Row]], eval_rows: list[Row] | None, cfg, tokenizer, seed: int
                      ) -> tuple[dict[str, list[_Part]], list[str] | None]:
    """Each source's rows split and built in its own format; classification labels come from every
    source (and the eval file), so that all share one verbalizer."""
    splits = [split_rows(r, cfg.val_fraction, seed, what=f"rows of {s.name}") if eval_rows is None
              else (shuffled(r, seed), []) for s, r in zip(mixed, rows)]
    names = words = None
    if cfg.format == "classification":
        names = label_names([row for train, held in splits for row in train + held] + (eval_rows or []), cfg)
        words = label_words(names, cfg.verbalizer)
    parts = {"train": [], "eval": []}
    for source, (train, held) in zip(mixed, splits):
        for split, split_of in (("train", train), ("eval", held)):
            examples, items, dropped, truncated = _examples(split_of, source.cfg, tokenizer, names)
            parts[split].append(_Part(examples, items, len(split_of), dropped, truncated))
    if eval_rows is None:  # held out of every source's training examples: the sources may share rows
        trained = {key for part in parts["train"] for key in example_keys(part.examples, part.items)}
        for part in parts["eval"]:
            part.examples, part.items, part.dropped[SEEN] = unseen(trained, part.examples, part.items)
    else:
        examples, items, dropped, truncated = _examples(shuffled(eval_rows, seed), cfg, tokenizer, names)
        parts["eval"] = [_Part(examples, items, len(eval_rows), dropped, truncated)]
    return parts, words


def _mix(parts: list[_Part], names: list[str], weights: list[float] | None, cap: int | None, seed: int
         ) -> tuple[list[Example], list[ClassifyItem] | None, DataReport]:
    """One split's examples from its parts: each source's ``mixture_counts`` share (sources with no
    examples in this split left aside; ``weights`` None: one eval file, taken whole), shuffled together
    (seeded), then capped; the report counts each source's examples."""
    counts = [len(p.examples) for p in parts]
    if weights is not None:
        having = [i for i, n in enumerate(counts) if n]
        taken = mixture_counts([counts[i] for i in having], [weights[i] for i in having]) if having else []
        counts = [0] * len(parts)
        for i, n in zip(having, taken):
            counts[i] = n
    chosen = shuffled([(i, k) for i, n in enumerate(counts) for k in range(n)], seed)[:cap]
    examples = [parts[i].examples[k] for i, k in chosen]
    items = None if parts[0].items is None else [parts[i].items[k] for i, k in chosen]
    report = _report(sum(p.rows for p in parts), examples, sum((p.dropped for p in parts), Counter()),
                     sum(p.truncated for p in parts))
    if weights is not None:
        report.sources = {name: sum(i == j for i, _ in chosen) for j, name in enumerate(names)}
        report.left_out = sum(len(p.examples) for p in parts) - sum(counts)
    return examples, items, report
