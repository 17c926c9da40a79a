"""Domain text for continued pre-training: documents to packed blocks of exactly ``max_length`` tokens.

Each document is tokenized and followed by the EOS token (so the model sees where one ends), the
documents are concatenated into one stream, and the stream is cut into full blocks; no padding
is needed. The last partial block is dropped and counted. Labels are the inputs: the model shifts
them itself, so every token is a target.
"""

from __future__ import annotations

from tuneforge.data.collate import Example
from tuneforge.data.readers import Row, shuffled, split_rows, text_field
from tuneforge.core.errors import UserError


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, so ends of documents and answers cannot be marked",
                        "tokenizer", fix="use a model whose tokenizer defines an EOS token")
    return tokenizer.eos_token_id


def token_stream(docs: list[tuple[str, str]], tokenizer) -> tuple[list[int], list[tuple[int, str]]]:
    """The documents' tokens, each document followed by EOS, and where each document starts in the
    stream: (offset, its "file:line")."""
    eos, stream, starts = eos_id(tokenizer), [], []
    for text, where in docs:
        starts.append((len(stream), where))
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    return stream, starts


def blocks(stream: tuple[list[int], list[tuple[int, str]]], max_length: int) -> tuple[list[Example], int]:
    """(full blocks of ``max_length`` tokens, how many partial blocks were dropped: 0 or 1). A block's
    source names the document its first token is in, and the block's place in the stream."""
    tokens, starts = stream
    full = len(tokens) // max_length
    examples = []
    for i in range(full):
        where = next(w for offset, w in reversed(starts) if offset <= i * max_length)
        ids = tokens[i * max_length:(i + 1) * max_length]
        examples.append(Example(ids, list(ids), f"{where} (block {i} of {max_length} tokens)"))
    return examples, int(len(tokens) % max_length > 0)


def documents(rows: list[Row], text_column: str) -> tuple[list[tuple[str, str]], int]:
    """(the non-empty documents of the rows with where each came from, how many empty ones were skipped)."""
    docs = [("" if text_column in row and row[text_column] is None else text_field(row, text_column), row.where)
            for row in rows]  # a null document (a table's missing value) is an empty one
    kept = [d for d in docs if d[0].strip()]
    return kept, len(docs) - len(kept)


def text_splits(rows: list[Row], eval_rows: list[Row] | None, cfg, tokenizer, seed: int
                ) -> dict[str, tuple[list[Example], int, int]]:
    """{"train", "eval"}: (blocks, documents, dropped). One document (a plain-text file) is split
    by blocks; several are split by document, so that no document lands in both splits."""
    docs, empty = documents(rows, cfg.text_column)
    if eval_rows is None and len(docs) == 1:
        examples, partial = blocks(token_stream(docs, tokenizer), cfg.max_length)
        train, held = split_rows(examples, cfg.val_fraction, seed, what=f"blocks of {cfg.max_length} tokens")
        return {"train": (train, 1, empty + partial), "eval": (held, 1, 0)}
    if eval_rows is None:
        (train_docs, eval_docs), eval_empty = split_rows(docs, cfg.val_fraction, seed, what="documents"), 0
    else:
        train_docs, (eval_docs, eval_empty) = docs, documents(eval_rows, cfg.text_column)
    out = {}
    for split, split_docs, skipped in (("train", train_docs, empty), ("eval", eval_docs, eval_empty)):
        examples, partial = blocks(token_stream(split_docs, tokenizer), cfg.max_length)
        out[split] = (shuffled(examples, seed), len(split_docs) + skipped, skipped + partial)
    return out
