"""Files to rows: JSONL (or a JSON array), CSV, TSV and plain text, every mistake named by file and line.

A row is a dict that also remembers where it came from (``row.where``, "file:line"), so that a
missing field or a bad label found much later can still point the user at the line to fix.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any, Sequence

from tuneforge.errors import UserError

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}


class Row(dict):
    """One record of a data file; ``where`` is "file:line" for error messages."""

    def __init__(self, values: dict, where: str):
        super().__init__(values)
        self.where = where


def field(row: Row, name: str) -> Any:
    """``row[name]``, or a UserError that names the line and the fields the row does have."""
    if name not in row:
        present = ", ".join(map(str, row)) or "none"
        raise UserError(f"missing field '{name}' (the row has: {present})", row.where,
                        fix=f"add '{name}' to every row, or point the config at the right column")
    return row[name]


def read_text(path: str | Path) -> str:
    """The whole file as text; a missing file, non-UTF-8 bytes or an empty file is a UserError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError("no such data file", str(path), fix="check data.path / data.eval_path") from None
    except IsADirectoryError:
        raise UserError("this is a folder, not a data file", str(path), fix="name a file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"byte {exc.start} (0x{raw[exc.start]:02x}) is not UTF-8", f"{path}:{line}",
                        fix="re-save the file as UTF-8 (for example: iconv -f latin1 -t utf-8)") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write: not content
    if not text.strip():
        raise UserError("the data file is empty", str(path), fix="check that the file was written completely")
    return text


def read_rows(path: str | Path, cfg) -> list[Row]:
    """Rows of a data file, chosen by suffix: .jsonl/.json, .csv, .tsv, anything else is plain text.

    A plain-text file is one row, ``{cfg.text_column: the whole file}``: a document stream.
    """
    path = Path(path)
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        rows = _json_array(text, path) if text.lstrip().startswith("[") else _jsonl(text, path)
    elif suffix in TABLE_SUFFIXES:
        rows = _table(text, path, TABLE_SUFFIXES[suffix], cfg.columns)
    else:
        rows = [Row({cfg.text_column: text}, f"{path}:1")]
    if not rows:
        raise UserError("the data file has no rows", str(path), fix="add rows below the header")
    return rows


def _jsonl(text: str, path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"bad JSON: {exc.msg} at column {exc.colno}", f"{path}:{number}",
                            fix="each line must be one complete JSON object") from None
        if not isinstance(value, dict):
            raise UserError(f"expected a JSON object, got {type(value).__name__}", f"{path}:{number}",
                            fix="write one {...} object per line")
        rows.append(Row(value, f"{path}:{number}"))
    return rows


def _json_array(text: str, path: Path) -> list[Row]:
    """A .json file holding one array of objects (the Alpaca release's layout)."""
    decoder, rows = json.JSONDecoder(), []
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"bad JSON: {exc.msg}", f"{path}:{exc.lineno}", fix="fix the JSON syntax") from None
    # Re-walk the array only to learn each object's line: errors later should name it.
    position = text.index("[") + 1
    for index, value in enumerate(values):
        while text[position] in " \t\r\n,":
            position += 1
        where = f"{path}:{text.count(chr(10), 0, position) + 1}"
        _, position = decoder.raw_decode(text, position)
        if not isinstance(value, dict):
            raise UserError(f"item {index} is not a JSON object", where, fix="make the array a list of {...} objects")
        rows.append(Row(value, where))
    return rows


def _table(text: str, path: Path, delimiter: str, columns: Sequence[str] | None) -> list[Row]:
    # TSV fields are taken literally (no quoting): review snippets start with quote marks that a
    # CSV-style reader would swallow. CSV keeps the standard quoting, so fields may hold commas.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header, rows = list(columns) if columns else None, []
    line = 1  # where the next record starts; a quoted field may span several lines
    for record in reader:
        start, line = line, reader.line_num + 1
        if not record or (len(record) == 1 and not record[0].strip()):
            continue
        if header is None:
            header = [name.strip() for name in record]
            continue
        if len(record) != len(header):
            raise UserError(f"{len(record)} columns where the header has {len(header)} ({', '.join(header)})",
                            f"{path}:{start}",
                            fix="quote fields that contain the delimiter, or fix data.columns")
        rows.append(Row(dict(zip(header, record)), f"{path}:{start}"))
    return rows


def split_rows(items: list, val_fraction: float, seed: int, what: str = "rows") -> tuple[list, list]:
    """A seeded shuffle, then the last ``val_fraction`` (at least one item) held out.

    The same items and seed always give the same split, so figures compare across runs.
    """
    items = shuffled(items, seed)
    if val_fraction <= 0:
        return items, []
    held = max(1, round(len(items) * val_fraction))
    if held >= len(items):
        raise UserError(f"{len(items)} {what} are too few to hold out a validation share of {val_fraction}",
                        "data.val_fraction", fix="add rows, lower data.val_fraction, or give data.eval_path")
    return items[:-held], items[-held:]


def shuffled(items: list, seed: int) -> list:
    """A seeded shuffle, so that a cap (max_examples) takes a random sample, not a file's first rows."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order]
