"""Typed, frozen dataclasses from plain mappings: every key and type checked, every error naming
the key and where it was written (``file:line`` in a YAML file, or ``--set key``).

A value typed on the command line (``--set key=value``) is parsed by the type of the field it lands
in, so ``--set train.learning_rate=1e-4`` is a float and ``--set data.instruction=1`` a string.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from typing import Any, Callable, Literal, Mapping

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
        given = max((k for k in self.from_cli if key == k or key.startswith(k + ".")), key=len, default=None)
        if given is not None:  # a key --set gave, or one inside the value it gave (data.path.weight)
            return f"--set {given}" if given == key else f"--set {given}: key '{key}'"
        line = self.lines.get(key)
        return f"{self.source}:{line}: key '{key}'" if line else f"{self.source}: key '{key}'"


def line_numbers(text: str) -> dict[str, int]:
    """Map each dotted key of a YAML mapping to its 1-based line, for error messages; a list's items by
    their index (``compare.methods.0``, the item's first line; ``compare.methods.0.r``)."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{prefix}{key.value}"
                lines[dotted] = key.start_mark.line + 1
                walk(value, dotted + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[f"{prefix}{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}{i}.")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


# Far deeper than any configuration nests. YAML's composer, the config walk and the YAML writer recurse,
# and some thousands of levels exhaust Python's stack; aliases can also expand a short file to billions of
# values.
MAX_DEPTH = 32
MAX_VALUES = 100_000
INT64 = 2**63
_DECIMAL = re.compile(r"[-+]?[0-9][0-9_]*")
_RESOLVER = yaml.resolver.Resolver()  # a plain scalar's type, as safe_load resolves it
_MERGE = "tag:yaml.org,2002:merge"


def load_yaml(text: str, where: Callable[[str, int | None], str]) -> Any:
    """``yaml.safe_load`` of text a user wrote, or a UserError located by ``where(dotted key, line)``: for
    nesting deeper than MAX_DEPTH, an integer longer than Python reads from text (a ValueError inside
    PyYAML), a key written twice in one mapping (PyYAML keeps the last, silently), and aliases that expand
    past MAX_VALUES values or refer to themselves."""
    if found := _scan(text):
        what, key, line, fix = found
        raise UserError(what, where(key, line), fix=fix)
    try:
        data = yaml.safe_load(text)
    except ValueError as exc:  # a value PyYAML cannot construct, such as a date of month 13
        raise UserError(f"cannot read a value: {str(exc).splitlines()[0]}", where("", None),
                        fix="correct the value") from None
    if found := _expanded(data):
        raise UserError(found[0], where(found[1], None), fix="write the values out without aliases")
    return data


def _scan(text: str) -> tuple[str, str, int, str] | None:
    """(what is wrong, its dotted key, its line, what to do) for the first value nested deeper than MAX_DEPTH, the
    first decimal integer longer than Python reads from text, or the first key written a second time in
    its mapping. Read from the parser's events: unlike YAML's composer, the parser does not recurse."""
    digits = sys.get_int_max_str_digits() or math.inf
    # per open collection: [a mapping, waiting for a key, the current key or index, {(type, key): its line}]
    open_: list[list] = []

    def ended() -> None:  # a node inside the innermost collection is complete
        if open_:
            if open_[-1][0]:
                open_[-1][1] = not open_[-1][1]
            else:
                open_[-1][2] += 1

    def key() -> str:
        return _dotted([c[2] for c in open_ if c[2] != ""])

    try:
        for event in yaml.parse(text):
            line = event.start_mark.line + 1
            if isinstance(event, yaml.CollectionStartEvent):
                mapping = isinstance(event, yaml.MappingStartEvent)
                open_.append([mapping, True, "" if mapping else 0, {}])
                if len(open_) > MAX_DEPTH:
                    return f"nested deeper than {MAX_DEPTH} levels", key(), line, "correct the value"
            elif isinstance(event, yaml.CollectionEndEvent):
                open_.pop()
                ended()
            elif isinstance(event, yaml.ScalarEvent):
                if open_ and open_[-1][0] and open_[-1][1]:
                    open_[-1][2] = event.value
                    # a key is its value and its type: 1 and "1", true and "true" are two keys; a plain << merges
                    tag = event.tag or _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
                    seen = open_[-1][3]
                    if (tag, event.value) in seen and tag != _MERGE:
                        first = seen[tag, event.value]
                        return (f"the key {event.value!r} is written twice (first on line {first})", key(), line,
                                "keep one: YAML would silently take the last")
                    seen.setdefault((tag, event.value), line)
                elif (event.style is None and event.implicit[0] and _DECIMAL.fullmatch(event.value)
                      and sum(c.isdigit() for c in event.value) > digits):
                    return (f"a number of {len(event.value):,} digits is not a setting", key(), line,
                            "correct the value")
                ended()
            elif isinstance(event, yaml.AliasEvent):
                ended()
    except yaml.YAMLError:
        return None  # safe_load reports it, with its line
    return None


def _expanded(data: Any) -> tuple[str, str] | None:
    """(what is wrong, its dotted key) when ``data``, with its aliases followed, nests deeper than
    MAX_DEPTH, refers to itself, or holds more than MAX_VALUES values; walked without recursion."""
    pending, seen = [(data, ())], 0
    while pending:
        node, keys = pending.pop()
        seen += 1
        if seen > MAX_VALUES:
            return f"more than {MAX_VALUES:,} values once its aliases are expanded", _dotted(keys)
        if isinstance(node, (dict, list)) and len(keys) >= MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded", _dotted(keys)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        pending += [(v, (*keys, k)) for k, v in items]
    return None


def _dotted(keys) -> str:
    """A value's path as a dotted key, its first levels only."""
    return ".".join(map(str, keys[:4])) + (".(...)" if len(keys) > 4 else "")


def _from_cli(value: FromCli, key: str, where: Where) -> Any:
    """A value typed after ``--set key=``, read as YAML."""
    return load_yaml(value, lambda _key, _line: where(key))


def _shown(value: Any) -> str:
    """``value`` for an error line: a long one cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text):,} characters)"


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
    wrong = UserError(f"expected {type_name(tp)}, got {_shown(value)}", where(key), fix="correct the value")
    if tp is Any:
        return _from_cli(value, key, where) if isinstance(value, FromCli) else value
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, FromCli) and value.strip().lower() in ("null", "none", "~") and type(None) in args:
            return None
        if value is None and type(None) in args:
            return None
        if isinstance(value, FromCli) and value.lstrip().startswith(("[", "{")):  # a list or mapping, not a string
            try:
                value = _from_cli(value, key, where)
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
            raise UserError(f"{_shown(value)} is not allowed", where(key), fix=f"use {type_name(tp)}")
        return value
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    if isinstance(value, FromCli):  # anything but a string is parsed as YAML first
        try:
            value = _from_cli(value, key, where)
        except yaml.YAMLError:
            raise wrong from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong
        if not -INT64 <= value < INT64:  # torch, the seeds and every count hold 64 bits
            raise UserError(f"{key.rsplit('.', 1)[-1]} has {len(str(abs(value)))} digits, more than a setting holds "
                            "(64 bits)", where(key), fix="correct the value")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise wrong from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer past a float's range
                number = math.inf
        else:
            raise wrong
        if not math.isfinite(number):  # NaN passes every comparison, and infinity breaks every count
            raise UserError(f"{key.rsplit('.', 1)[-1]} must be a finite number, got {_shown(value)}", where(key),
                            fix="correct the value")
        return number
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
            raise UserError(f"expected a mapping of {tp.__name__} keys, got {_shown(value)}", where(key))
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
