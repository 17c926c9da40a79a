"""Typed, frozen dataclasses from plain mappings: every key and type checked, every error naming
the key and where it was written (``file:line`` in a YAML file, or ``--set key``).

A value typed on the command line (``--set key=value``) is parsed by the type of the field it lands
in, so ``--set train.learning_rate=1e-4`` is a float and ``--set data.instruction=1`` a string.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping

import yaml

from tuneforge.core.errors import UserError


class FromCli(str):
    """A value typed on the command line: parsed by the type of the field it lands in."""


class Where:
    """Names where a key was written: ``file:line: key 'k'``, ``--set k``, or ``source: key 'k'``."""

    def __init__(self, source: str = "config", lines: Mapping[str, int] | None = None,
                 from_cli: set[str] | None = None):
        self.source, self.lines, self.from_cli = source, lines or {}, from_cli or set()

    def __call__(self, key: str) -> str:
        if key in self.from_cli:
            return f"--set {key}"
        line = self.lines.get(key)
        return f"{self.source}:{line}: key '{key}'" if line else f"{self.source}: key '{key}'"


def line_numbers(text: str) -> dict[str, int]:
    """Map each dotted key of a YAML mapping to its 1-based line, for error messages."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{prefix}{key.value}"
                lines[dotted] = key.start_mark.line + 1
                walk(value, dotted + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, where: Where) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = UserError(f"expected {type_name(tp)}, got {value!r}", where(key), fix="correct the value")
    if tp is Any:
        return yaml.safe_load(value) if isinstance(value, FromCli) else value
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, FromCli) and value.strip().lower() in ("null", "none", "~") and type(None) in args:
            return None
        if value is None and type(None) in args:
            return None
        if isinstance(value, FromCli) and value.lstrip().startswith(("[", "{")):  # a list or mapping, not a string
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise wrong from None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, where)
            except UserError:
                if _shaped(value, arg):  # a list for the list type, a mapping for the mapping: its own error says more
                    raise
        raise wrong
    if origin is Literal:
        value = str(value) if isinstance(value, FromCli) else value
        if value not in args:
            raise UserError(f"{value!r} is not allowed", where(key), fix=f"use {type_name(tp)}")
        return value
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    if isinstance(value, FromCli):  # anything but a string is parsed as YAML first
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise wrong from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # one item may be written without brackets
        if not isinstance(value, list):
            raise wrong
        return [_coerce(v, args[0], key, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        return {str(k): _coerce(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"expected a mapping of {tp.__name__} keys, got {value!r}", where(key))
        return build(tp, value, where, prefix=key + ".")
    raise TypeError(f"config type {tp!r} is not supported")  # a tuneforge bug, not a user error


def _shaped(value: Any, tp) -> bool:
    """Whether ``value`` has the container shape of ``tp`` (a list for a list type, a mapping for a
    dataclass or dict), so that an error inside it is the one to report."""
    origin = typing.get_origin(tp)
    if isinstance(value, list):
        return origin in (list, tuple)
    return isinstance(value, dict) and (origin is dict or dataclasses.is_dataclass(tp))


def build(cls, raw: Mapping[str, Any], where: Where | None = None, prefix: str = ""):
    """Build the frozen dataclass ``cls`` from a mapping, checking every key and type. A check in
    ``cls.__post_init__`` that names its key as ``"<prefix>key"`` is reported where that key was written."""
    where = where or Where()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise UserError(f"unknown key '{prefix}{key}'", where(prefix + str(key)),
                            fix=f"{hint}allowed keys: {', '.join(prefix + f for f in fields)}")
        values[key] = _coerce(value, hints[key], prefix + str(key), where)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"missing required key '{prefix}{name}'", where.source, fix=f"add '{prefix}{name}'")
    try:
        return cls(**values)
    except UserError as exc:  # a __post_init__ check names its key bare or as "<prefix>key"
        key = (exc.where or "").removeprefix(prefix)
        if key in fields:
            raise UserError(exc.what, where(prefix + key), exc.fix) from None
        raise
