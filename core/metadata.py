"""Reference metadata as JSON, and filters on it: the rules both sides check. The service refuses
what breaks them (INVALID_ARGUMENT naming the field); the SDK and the CLI use the same functions to
read the filter syntax and to say what is wrong before anything is sent.

Metadata is one JSON object: strings, finite numbers, booleans, null, lists and objects, at most
``MAX_DEPTH`` levels of lists and objects (the metadata object itself is level 1). No NUL and no
lone surrogate in any key or string (PostgreSQL's jsonb stores neither). The size limit is the
service's (``max_metadata_bytes``, 16 KiB of UTF-8 JSON).

A filter is a list of :class:`Condition` s, all of which must hold. Its JSON syntax (SDK, CLI):
``{"lang": "en", "year": {"gte": 2020, "lt": 2025}, "tags": {"in": ["a", "b"]}, "draft": {"exists": false}}``
— a key with a plain value is ``eq``; an object gives one condition per operator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Mapping

MAX_DEPTH = 8  # levels of lists and objects in metadata, the metadata object itself included
MAX_CONDITIONS = 64  # conditions in one filter
MAX_IN_VALUES = 1024  # values of one `in` condition
OPERATORS = ("eq", "in", "gt", "gte", "lt", "lte", "exists")
RANGES = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


class MetadataError(ValueError):
    """Metadata or a filter that breaks the rules; the message names where and what."""


def _check_string(text: str, where: str) -> None:
    if "\x00" in text:
        raise MetadataError(f"{where} contains NUL (\\u0000), which cannot be stored")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MetadataError(f"{where} contains a lone surrogate (an unpaired \\ud800-\\udfff escape)") from None


def _check_number(value: int | float, where: str) -> None:
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond any double
        finite = False
    if not finite:
        raise MetadataError(f"{where} must be a finite number (no NaN, Infinity or beyond ±1.8e308)")


def check_value(value: Any, where: str, depth: int = 1) -> None:
    """``value`` is storable JSON nested at most ``MAX_DEPTH`` deep (``depth``: its own level)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_string(value, where)
    elif isinstance(value, (int, float)):
        _check_number(value, where)
    elif isinstance(value, (list, tuple, dict)):
        if depth > MAX_DEPTH:
            raise MetadataError(f"{where} nests lists and objects deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise MetadataError(f"{where} has a key that is not a string: {key!r}")
                _check_string(key, f"{where} key {key[:40]!r}")
                check_value(item, f"{where}[{key[:40]!r}]", depth + 1)
        else:
            for index, item in enumerate(value):
                check_value(item, f"{where}[{index}]", depth + 1)
    else:
        raise MetadataError(f"{where} is a {type(value).__name__}; metadata holds only JSON values")


def check_metadata(metadata: Any, where: str = "metadata") -> dict:
    """``metadata`` if it is a JSON object that may be stored; MetadataError otherwise."""
    if not isinstance(metadata, dict):
        raise MetadataError(f"{where} must be a JSON object, got {_kind(metadata)}")
    check_value(metadata, where)
    return metadata


def _refuse_constant(name: str):
    raise MetadataError(f"{name} is not JSON (numbers must be finite)")


def parse_json(text: str, where: str) -> Any:
    """A JSON text as Python values; MetadataError saying what is wrong (never RecursionError)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except MetadataError as err:
        raise MetadataError(f"{where}: {err}") from None
    except RecursionError:
        raise MetadataError(f"{where} nests lists and objects deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, or an integer of more than 4300 digits
        raise MetadataError(f"{where} is not JSON ({err.args[0] if err.args else err})") from None


def metadata_from_json(text: str, where: str = "metadata_json") -> dict:
    return check_metadata(parse_json(text, where), where)


def _whole_with_exponent(value: Any) -> bool:
    """Whether ``value`` holds a whole float that Python spells with an exponent (1e+20)."""
    if isinstance(value, float):
        return value.is_integer() and abs(value) >= 1e16
    if isinstance(value, dict):
        return any(_whole_with_exponent(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_whole_with_exponent(v) for v in value)
    return False


def _positional(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e16:
        return f"{int(Decimal(repr(value)))}.0"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_compact(str(k))}:{_positional(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_positional(v) for v in value) + "]"
    return _compact(value)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def metadata_to_json(metadata: Mapping[str, Any]) -> str:
    """Compact JSON text of metadata (UTF-8 characters as they are). A whole float that Python
    spells with an exponent (1e+20) is written out with ".0": PostgreSQL's jsonb prints numbers
    positionally, so 1e+20 would come back as the integer 100000000000000000000 and a float as
    large as 1.7976931348623157e+308 as an integer of another value."""
    if _whole_with_exponent(metadata):
        return _positional(metadata)
    return _compact(metadata)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, str, int, float))


@dataclass(frozen=True)
class Condition:
    """One test of one top-level metadata key (see ``FilterOp`` in memories.proto for each)."""

    key: str
    op: str
    value: Any

    def to_json(self) -> dict:
        return {self.key: {self.op: self.value}}


def check_condition(key: str, op: str, value: Any, where: str) -> Condition:
    """A condition if it is well formed; MetadataError naming ``where`` otherwise."""
    if not isinstance(key, str):
        raise MetadataError(f"{where}: the key must be a string")
    _check_string(key, f"{where} key")
    if op not in OPERATORS:
        raise MetadataError(f"{where}: unknown operator {op!r} (use {', '.join(OPERATORS)})")
    where = f"{where} {op}"
    if op == "eq":
        if not _scalar(value):
            raise MetadataError(f"{where} takes a string, number, boolean or null, got {_kind(value)} "
                                "(a list value matches when one of its elements does)")
        check_value(value, where)
    elif op == "in":
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_IN_VALUES:
            raise MetadataError(f"{where} takes a list of 1 to {MAX_IN_VALUES} values, got {_kind(value)}"
                                + (f" of {len(value)}" if isinstance(value, (list, tuple)) else ""))
        for index, item in enumerate(value):
            if not _scalar(item):
                raise MetadataError(f"{where}[{index}] must be a string, number, boolean or null, got {_kind(item)}")
            check_value(item, f"{where}[{index}]")
        value = tuple(value)
    elif op in RANGES:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MetadataError(f"{where} takes a number (or a string, compared by code point), got {_kind(value)}")
        check_value(value, where)
    elif not isinstance(value, bool):
        raise MetadataError(f"{where} takes true (the key is present) or false (absent), got {_kind(value)}")
    return Condition(key, op, value)


def conditions_from_filter(spec: Mapping[str, Any] | None, where: str = "filter") -> list[Condition]:
    """The conditions of the JSON filter syntax: ``{key: value}`` (eq) or ``{key: {op: value, ...}}``."""
    if spec is None:
        return []
    if not isinstance(spec, Mapping):
        raise MetadataError(f"{where} must be a JSON object like {{\"lang\": \"en\", \"year\": {{\"gte\": 2020}}}}, "
                            f"got {_kind(spec)}")
    conditions = []
    for key, test in spec.items():
        if isinstance(test, Mapping):
            if not test:
                raise MetadataError(f"{where} key {key!r}: an empty object tests nothing "
                                    f"(use one of {', '.join(OPERATORS)})")
            for op, value in test.items():
                conditions.append(check_condition(key, op, value, f"{where} key {key!r}"))
        else:
            conditions.append(check_condition(key, "eq", test, f"{where} key {key!r}"))
    if len(conditions) > MAX_CONDITIONS:
        raise MetadataError(f"{where} has {len(conditions)} conditions; at most {MAX_CONDITIONS}")
    return conditions


def parse_filter(text: str, where: str = "filter") -> list[Condition]:
    """The conditions of a filter written as JSON text (the CLI's ``--filter``)."""
    return conditions_from_filter(parse_json(text, where), where)
