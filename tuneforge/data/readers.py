"""Files to rows: JSONL (or a JSON array), CSV, TSV, plain text, Parquet, Arrow IPC and a folder
written by ``datasets``' ``save_to_disk``; every mistake named by file and line (or row).

A row is a dict that also remembers where it came from (``row.where``, "file:line" or "file:row N"),
so that a missing field or a bad label found much later can still point the user at the line to fix.
What a file is comes from its first bytes as well as its name: a binary file is never read as text,
and a Parquet file named .txt is refused with the name it should have. Nothing is fetched from the
network: a Hub dataset is saved with ``save_to_disk`` first, and the folder is read here.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from tuneforge.core.errors import UserError

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
ARROW_SUFFIXES = {".arrow", ".feather", ".ipc"}
ACCEPTED = ".jsonl, .json, .csv, .tsv, .parquet, .arrow, a `datasets` folder (save_to_disk) or UTF-8 text"

# First bytes of the binary files a data path most often names by mistake; Parquet and Arrow are read.
MAGIC = [(b"PAR1", "Parquet"), (b"ARROW1", "Arrow"), (b"\xff\xff\xff\xff", "Arrow stream"), (b"FEA1", "Feather v1"),
         (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
         (b"\x28\xb5\x2f\xfd", "zstd"), (b"SQLite format 3\x00", "SQLite"), (b"\x93NUMPY", "NumPy"),
         (b"%PDF-", "PDF"), (b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG")]
READABLE = {"Parquet": "parquet", "Arrow": "arrow", "Arrow stream": "arrow", "Feather v1": "arrow"}
KIND_SUFFIX = {"parquet": ".parquet", "arrow": ".arrow"}


class Row(dict):
    """One record of a data file; ``where`` is "file:line" (text files) or "file:row N" for error messages."""

    def __init__(self, values: dict, where: str):
        super().__init__(values)
        self.where = where


def field(row: Row, name: str) -> Any:
    """``row[name]``, or a UserError that names the line and the fields the row does have. A null is
    missing too (Parquet and Arrow tables fill a key a row lacks with null): never the text "None"."""
    if row.get(name) is None:
        present = ", ".join(_short(str(key)) for key, value in row.items() if value is not None) or "none"
        what = f"field '{name}' is null" if name in row else f"missing field '{name}'"
        fix = f"give '{name}' a value in every row, or point the config at the right column"
        if Path(row.where.rsplit(":", 1)[0]).suffix.lower() in (".csv", ".tsv"):  # its header names the fields
            present = f"the fields the file's first line names: {present}"
            fix += "; a file without a header row needs data.columns, e.g. [id, score, text]"
        raise UserError(f"{what} (the row has {present})" if present.startswith("the fields") else
                        f"{what} (the row has: {present})", row.where, fix=fix)
    return row[name]


def _short(name: str, most: int = 40) -> str:  # a field's name as an error shows it
    return name if len(name) <= most else name[:most - 3] + "..."


def as_text(value: Any, what: str, where: str) -> str:
    """``value`` if it is a string: a number, list or object would be trained on as its Python repr."""
    if isinstance(value, str):
        return value
    kind = ("null" if value is None else "true/false" if isinstance(value, bool) else
            f"a number ({value})" if isinstance(value, (int, float)) else f"a {type(value).__name__}")
    raise UserError(f"{what} is {kind}, not text", where,
                    fix="write it as a string (a number in quotes), or point the config at the column that holds text")


def text_field(row: Row, name: str) -> str:
    """``field(row, name)``, which must be text."""
    return as_text(field(row, name), f"field '{name}'", row.where)


class Source(NamedTuple):
    """One training source: its name in reports, the DataCfg that reads it and builds its examples
    (data's own, with this source's path, format, columns and text_column), its weight and row cap."""

    name: str
    cfg: Any
    weight: float
    max_rows: int | None


def sources(cfg) -> list[Source]:
    """The training sources of a DataCfg: one for a single ``path``, one per item of a list (a mixture)."""
    if not isinstance(cfg.path, (list, tuple)):
        return [Source(str(cfg.path), cfg, 1.0, None)]
    out, seen = [], Counter()
    for item in cfg.path:
        seen[item.path] += 1  # the same file twice (other columns, say) gets a second name
        name = item.path if seen[item.path] == 1 else f"{item.path}#{seen[item.path]}"
        own = {key: getattr(item, key) for key in ("format", "columns", "text_column") if getattr(item, key) is not None}
        out.append(Source(name, dataclasses.replace(cfg, path=item.path, **own), item.weight, item.max_rows))
    return out


def file_kind(path: str | Path) -> str:
    """What ``path`` holds, from its first bytes and its name: "datasets" (a save_to_disk folder),
    "parquet", "arrow", "json", "table" (CSV/TSV) or "text". A missing path, another folder, a binary
    file, or a Parquet/Arrow file under another suffix (or the reverse) is a UserError."""
    path = Path(path)
    if path.is_dir():
        if _datasets_split(path, note=False) is not None:
            return "datasets"
        raise UserError("this is a folder, not a data file", str(path),
                        fix="name a file, or a folder written by datasets' save_to_disk")
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except FileNotFoundError:
        hub = "" if path.suffix or "/" not in str(path) else "; Hub dataset names are not fetched: save one with " \
                                                             "datasets' save_to_disk and give that folder"
        raise UserError("no such data file", str(path), fix="check data.path / data.eval_path" + hub) from None
    suffix = path.suffix.lower()
    named = "parquet" if suffix in PARQUET_SUFFIXES else "arrow" if suffix in ARROW_SUFFIXES else None
    found = next((name for magic, name in MAGIC if head.startswith(magic)), None)
    if found in READABLE:
        if READABLE[found] == named:
            return named
        raise UserError(f"this is a {found} file, but its name ends in '{suffix}', so it would be read as "
                        f"{_kind_of_suffix(suffix)}", str(path),
                        fix=f"rename it to {path.stem}{KIND_SUFFIX[READABLE[found]]}")
    if named:
        raise UserError(f"this is not {'a Parquet' if named == 'parquet' else 'an Arrow'} file (its first bytes are "
                        f"{head[:6]!r})", str(path),
                        fix="check that it was written completely, or name it for what it holds")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError("this is UTF-16 text", str(path), fix="re-save the file as UTF-8 (for example: iconv -f utf-16 "
                                                              "-t utf-8)")
    if found or _binary(head):
        compressed = found in ("gzip", "zip", "bzip2", "xz", "zstd")
        raise UserError(f"this is a binary file{f' ({found})' if found else ''}, not a data file tuneforge reads",
                        str(path), fix=("decompress it, or " if compressed else "") + f"use {ACCEPTED}")
    return "json" if suffix in JSON_SUFFIXES else "table" if suffix in TABLE_SUFFIXES else "text"


def _kind_of_suffix(suffix: str) -> str:
    if suffix in JSON_SUFFIXES:
        return "JSON"
    if suffix in TABLE_SUFFIXES:
        return suffix[1:].upper()
    return {".parquet": "Parquet", ".arrow": "Arrow"}.get(suffix, "text")


def _binary(head: bytes) -> bool:
    """NUL bytes, or many control characters: no text file, in any 8-bit encoding, has them.
    (Text in another encoding, latin-1 say, has neither, and gets the advice to re-save it as UTF-8.)"""
    if b"\x00" in head:
        return True
    controls = sum(b < 32 and b not in b"\t\n\r\f\x1b" for b in head)
    return controls > len(head) // 10


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


def read_rows(path, cfg) -> list[Row]:
    """Rows of a data file, by what it holds (``file_kind``): JSON, CSV/TSV, Parquet, Arrow, a
    ``datasets`` folder, or plain text.

    A plain-text file is one row, ``{cfg.text_column: the whole file}``: a document stream, which
    only ``format: text`` trains on. A list of sources (a mixture) gives every source's rows, unmixed.
    """
    if isinstance(path, (list, tuple)):
        return [row for source in sources(dataclasses.replace(cfg, path=path))
                for row in read_rows(source.cfg.path, source.cfg)]
    path = Path(path)
    kind = file_kind(path)
    if kind in ("parquet", "arrow", "datasets"):
        rows = _arrow_rows(path, kind)
    else:
        text = read_text(path)
        if kind == "json":
            rows = _json_array(text, path) if text.lstrip().startswith("[") else _jsonl(text, path)
        elif kind == "table":
            rows = _table(text, path, TABLE_SUFFIXES[path.suffix.lower()], cfg.columns)
        elif getattr(cfg, "format", "text") != "text":
            looks = "it looks like JSON: rename it to .jsonl or .json, or " if text.lstrip()[:1] in "{[" else ""
            raise UserError(f"this is plain text, one document, and {cfg.format} data needs rows", str(path),
                            fix=f"{looks}give a file of rows (.jsonl, .json, .csv, .tsv, .parquet, .arrow), or set "
                                "data.format: text to train on the text itself")
        else:
            rows = [Row({cfg.text_column: text}, f"{path}:1")]
    if not rows:
        raise UserError("the data file has no rows", str(path), fix="add rows below the header")
    return rows


def _datasets_split(folder: Path, note: bool = True) -> Path | None:
    """The folder of one ``datasets`` split (``Dataset.save_to_disk``): ``folder`` itself, or for a
    DatasetDict its "train" split (or its only one); None if ``folder`` is neither."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = list(json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"])
        except (ValueError, KeyError, TypeError):
            raise UserError("dataset_dict.json has no list of splits", str(folder / "dataset_dict.json"),
                            fix="write the folder again with DatasetDict.save_to_disk") from None
        split = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
        if split is None:
            raise UserError(f"a DatasetDict with the splits {', '.join(splits)} and none named 'train'", str(folder),
                            fix=f"name one split's folder, for example {folder / splits[0]}")
        if note:
            print(f"tuneforge: {folder}: a DatasetDict of {', '.join(splits)}; reading its '{split}' split",
                  file=sys.stderr)
        folder = folder / split
    marked = (folder / "state.json").is_file() or (folder / "dataset_info.json").is_file()
    return folder if marked and any(folder.glob("*.arrow")) else None


def _arrow_files(folder: Path) -> list[Path]:
    """A split's .arrow shards in order: as state.json lists them, else by name."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return [folder / item["filename"] for item in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(folder.glob("*.arrow"))


def _arrow_rows(path: Path, kind: str) -> list[Row]:
    """Rows of a Parquet or Arrow file, or of a ``datasets`` folder's shards, read a record batch
    at a time; nested values (a chat's list of messages) come back as lists and dicts. A folder's
    rows are numbered across its shards, as ``dataset[N - 1]`` numbers them."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("reading Parquet and Arrow files needs pyarrow", str(path), fix="pip install pyarrow") from None
    if kind == "datasets":
        label = _datasets_split(path)
        files = _arrow_files(label)
    else:
        label, files = path, [path]
    rows: list[Row] = []
    for file in files:
        for batch in _batches(file, "parquet" if kind == "parquet" else "arrow"):
            for values in batch.to_pylist():
                rows.append(Row(values, f"{label}:row {len(rows) + 1}"))
    return rows


def _batches(file: Path, kind: str) -> Iterator:
    """The record batches of one Parquet or Arrow IPC file (file or stream layout, as ``datasets`` writes)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            yield from pq.ParquetFile(file).iter_batches(batch_size=1024)
            return
        with pa.memory_map(str(file)) as source:
            magic = source.read(6)
            source.seek(0)
            if magic == b"ARROW1":
                reader = ipc.open_file(source)
                yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            elif magic.startswith(b"FEA1"):
                import pyarrow.feather as feather

                yield from feather.read_table(source).to_batches()
            else:
                yield from ipc.open_stream(source)
    except FileNotFoundError:
        raise UserError("a shard listed in state.json is missing", str(file),
                        fix="write the folder again with save_to_disk") from None
    except (pa.ArrowException, OSError) as exc:
        what = " ".join(str(exc).split())[:300]  # one line, however pyarrow words it
        raise UserError(f"cannot read this {'Parquet' if kind == 'parquet' else 'Arrow'} file: {what}", str(file),
                        fix="check that it was written completely") from None


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
