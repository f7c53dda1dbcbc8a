"""The config layer's error type and the helpers every section uses to word its complaints."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A config that cannot run: an unknown key or an impossible value. The CLI exits with 2."""


def suggest(name: str, options: Iterable[str]) -> str:
    """'; did you mean X?' for the closest option to `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def one_of(errs: list[str], name: str, value: Any, accepted: Iterable[Any]) -> None:
    """Appends to `errs` unless `value` is one of `accepted` (naming them, with a suggestion)."""
    accepted = tuple(accepted)
    if value not in accepted:
        hint = (
            suggest(value, [a for a in accepted if isinstance(a, str)])
            if isinstance(value, str)
            else ""
        )
        errs.append(f"{name} is {value!r}{hint}; accepted: {', '.join(repr(a) for a in accepted)}")


def finite_floats(errs: list[str], section: str, obj: Any) -> None:
    """Appends an error for every float field of the dataclass `obj` that is NaN or infinite
    (`nan <= 0` is False, so range checks alone let them through)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if (
            isinstance(value, numbers.Real)
            and not isinstance(value, numbers.Integral)
            and not math.isfinite(value)
        ):
            errs.append(f"{section}.{f.name} must be a finite number, got {value}")


def _matches(value: Any, tp: Any) -> bool | None:
    """Whether `value` fits the annotation `tp` (None: an annotation this check does not judge)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_matches(value, arg) for arg in typing.get_args(tp)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # numbers.Integral: NumPy's integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is tuple or origin is tuple:
        return isinstance(value, tuple | list)  # a list reads as the tuple (from_dict freezes it)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    return None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "a bool (True/False)", str: "a string"}


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if tp is tuple or typing.get_origin(tp) is tuple:
        return "a tuple"
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def type_problems(section: str, obj: Any) -> list[str]:
    """Every field of the dataclass `obj` (and of the dataclasses inside it) whose value is not
    of the field's declared type, as messages naming the dotted key. A config built in Python
    (a config file) skips the parsing that command-line and dict values go through, so
    `TrainConfig(steps="10")` would otherwise reach the range checks (`"10" <= 0`)."""
    errs: list[str] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{section}.{f.name}" if section else f.name
        tp = hints.get(f.name)
        if (
            dataclasses.is_dataclass(value)
            and not isinstance(value, type)
            and (tp is None or _matches(value, tp) is not False)
        ):
            errs += type_problems(key, value)
            continue
        if tp is not None and _matches(value, tp) is False:
            errs.append(f"{key} must be {_describe(tp)}, got {value!r} ({type(value).__name__})")
    return errs


def finite_tree(section: str, obj: Any) -> list[str]:
    """`finite_floats` over the dataclass `obj` and every dataclass inside it."""
    errs: list[str] = []
    finite_floats(errs, section, obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            errs += finite_tree(f"{section}.{f.name}" if section else f.name, value)
    return errs
