"""The config layer's error type and the helpers every section uses to word its complaints."""

from __future__ import annotations

import dataclasses
import difflib
import math
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
        if isinstance(value, float) and not math.isfinite(value):
            errs.append(f"{section}.{f.name} must be a finite number, got {value}")
