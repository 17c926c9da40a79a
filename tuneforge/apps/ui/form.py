"""The New run form: every key of a run configuration as a form field, and the form read back.

A field's help is the comment on its line in the dataclass's source (or the comment lines just
above it), read with ``tokenize``, so the page says what docs/config.md and the code say. The form's
values go through the YAML parser itself: each one is marked ``FromCli`` and parsed with its field's
type, exactly as ``--set key=value`` is, so a malformed value gets the parser's one-line error. A key
is taken only if the form shows it: one naming a whole section (``train: {output_dir: ...}``) would
replace what the page sets itself. Torch-free.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import tokenize
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tuneforge.core import config
from tuneforge.core.config import DataCfg, EvalCfg, FromCli, RunCfg, TrainCfg
from tuneforge.core.config.parse import type_name
from tuneforge.core.errors import UserError
from tuneforge.core.config.methods import METHODS

SOURCE = "the form"  # how the parser's errors name where a value came from
# Keys the page sets itself: the run's folder is RUNS/<run name>; compare has a page of its own.
HIDDEN = {"train.output_dir"}
SECTIONS = {"data": DataCfg, "train": TrainCfg, "eval": EvalCfg}


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Field name -> its documentation, for ``cls`` and the classes it extends: the comment lines
    just above the field, then the comment at the end of its line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass.__module__.startswith("tuneforge"):
            docs.update(_class_docs(klass))
    return docs


def _class_docs(cls) -> dict[str, str]:
    source = Path(inspect.getsourcefile(cls)).read_text(encoding="utf-8")
    trailing, whole_line = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (whole_line if tok.line.lstrip().startswith("#") else trailing)[tok.start[0]] = text
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    # A field without a comment of its own is described by its class's docstring, where it has one.
    fallback = " ".join(ast.get_docstring(node).split()) if ast.get_docstring(node) else ""
    docs = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line in whole_line:
            above.insert(0, whole_line[line])
            line -= 1
        parts = above + [trailing[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in trailing]
        docs[stmt.target.id] = " ".join(parts) or fallback
    return docs


def as_text(value: Any) -> str:
    """A value as the form shows it, which the parser reads back to the same value ("" is null)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _choices(tp) -> list[str] | None:
    """The allowed values of a Literal field (with "" first when it may be null), else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in args]
    literals = [a for a in args if typing.get_origin(a) is Literal]
    if len(literals) == 1 and set(args) == {literals[0], type(None)}:
        return [""] + [str(a) for a in typing.get_args(literals[0])]
    return None


def fields_of(cls, prefix: str) -> list[dict]:
    """One form field per dataclass field: key, type, widget kind, choices, default and help."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if key in HIDDEN or dataclasses.is_dataclass(hints[f.name]):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp, choices = hints[f.name], _choices(hints[f.name])
        kind = "bool" if tp is bool else "choice" if choices else "text"
        out.append({"key": key, "type": type_name(tp), "kind": kind, "choices": choices, "default": as_text(default),
                    "help": docs.get(f.name, "")})
    return out


@functools.cache
def schema() -> dict:
    """Every field the form shows: the run's own keys, each section's, and each method's."""
    return {"run": fields_of(RunCfg, ""),
            "sections": {name: fields_of(cls, f"{name}.") for name, cls in SECTIONS.items()},
            "methods": {name: fields_of(row.config, "method.") for name, row in METHODS.items()},
            "method_help": field_docs(config.MethodCfg)["name"]}


def _defaults(method: str) -> dict[str, str]:
    """Every key the form shows for ``method``, with its default: the keys it takes."""
    s = schema()
    every = [*s["run"], *(f for fs in s["sections"].values() for f in fs), *s["methods"].get(method, [])]
    return {f["key"]: f["default"] for f in every}


def to_raw(form: dict[str, Any], output_dir: str) -> dict:
    """The form's values as a YAML file's data: a value left empty or at its default is omitted (the
    default applies), every other is marked ``FromCli`` for the parser to read with its field's type."""
    method = str(form.get("method.name") or "")
    raw: dict[str, Any] = {"method": {"name": FromCli(method)}, "train": {"output_dir": output_dir}}
    defaults = _defaults(method)
    for key, value in form.items():
        where = f"{SOURCE}: key '{key}'"
        if key in HIDDEN:
            raise UserError("the page sets it: a run's folder is named by the run name", where,
                            fix="choose the run name instead")
        if key != "method.name" and key not in defaults:
            raise UserError("the form has no such setting" + (f" for method {method}" if key.startswith("method.")
                                                             else ""), where, fix="send the keys the form shows")
        if key == "method.name" or value is None:
            continue
        if not isinstance(value, (str, int, float)):
            raise UserError(f"expected text, got {type(value).__name__}", where, fix="send each value as text")
        text = str(value).strip()
        if text == "" or text == defaults[key]:
            continue
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = FromCli(text)
    return raw


def resolve(form: dict[str, Any], output_dir: str) -> RunCfg:
    """The run configuration the form describes, or the parser's UserError for its first bad value."""
    return config.from_dict(to_raw(form, output_dir), source=SOURCE)


def error_key(where: str | None) -> str | None:
    """The key a parser error names (``the form: key 'train.learning_rate'``), to mark its field."""
    match = re.search(r"key '([^']+)'", where or "")
    return match.group(1) if match else None


def path_values(cfg: RunCfg) -> dict[str, str]:
    """The keys of ``cfg`` that name files or folders (each must lie inside the folders the server was
    given), with their values (unset ones left out)."""
    sources = cfg.data.path if isinstance(cfg.data.path, list) else []  # a mixture names a file per source
    flat = {"model": cfg.model, "data.path": None if sources else cfg.data.path, "data.eval_path": cfg.data.eval_path,
            "method.tokenizer_name_or_path": cfg.method.args.get("tokenizer_name_or_path"),
            "train.start_from": cfg.train.start_from,
            **{f"data.path[{i}].path": source.path for i, source in enumerate(sources)}}
    return {k: v for k, v in flat.items() if v}
