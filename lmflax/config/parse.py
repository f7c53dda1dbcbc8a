"""Building configs from dicts, JSON and `KEY=VALUE` overrides, and writing them back.

`from_dict` / `to_dict` / `to_json` / `from_json` convert the tree; `override` replaces dotted
keys with Python values; `apply_overrides` parses command-line text as each field's type;
`split_overrides` takes `--config.KEY=VALUE` arguments off a command line. Unknown keys are
errors naming the closest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lmflax.config.errors import ConfigError, suggest
from lmflax.config.schema import Config, ModelSection, model_by_name, model_family


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def unknown_key(path: str, key: str, cls: type) -> ConfigError:
    names = sorted(_fields(cls))
    return ConfigError(
        f"unknown config key {path!r}{suggest(key, names)} "
        f"(valid keys of {cls.__name__}: {', '.join(names)})"
    )


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_scalar(path: str, text: str, tp: Any) -> Any:
    """Parses an override's text as the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse_scalar(path, text, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: cannot parse {text!r} as {tp}: {'; '.join(errors)}")
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"{path} takes a bool (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{path} takes an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{path} takes a number, got {text!r}") from None
    if tp is str:
        return text
    if origin is tuple or tp is tuple:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{path} takes a Python tuple literal, got {text!r}") from None
        return _freeze(value)
    raise ConfigError(f"{path}: cannot override a field of type {tp} from the command line")


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Checks a Python value (from a dict config) against the field type, converting lists to
    tuples and ints to floats where the field is a float."""
    if (
        isinstance(value, str)
        and tp is not str
        and typing.get_origin(tp) is None
        and tp in (int, float, bool)
    ):
        return _parse_scalar(path, value, tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list):
        return _freeze(value)
    return value


def from_dict(data: Mapping[str, Any], cls: type = Config, path: str = "") -> Any:
    """Builds a config dataclass from nested dicts, rejecting unknown keys with a suggestion.

    For `model`, the dict's 'family' key ('gpt', 'bert', ...) picks the class.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    data = dict(data)
    if cls is ModelSection:
        cls = model_family(path, data.pop("family", None))
    fields = _fields(cls)
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else key
        if key not in fields:
            raise unknown_key(sub, key, cls)
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            kwargs[key] = from_dict(value, tp, sub)
        else:
            kwargs[key] = _coerce(sub, value, tp)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as JSON-able nested dicts (models carry their 'family')."""
    out: dict[str, Any] = {}
    if isinstance(cfg, ModelSection):
        out["family"] = cfg.family
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def to_json(cfg: Config) -> str:
    """The config as indented JSON (what the trainer writes to workdir/config.json)."""
    return json.dumps(to_dict(cfg), indent=2)


def from_json(text: str) -> Config:
    """Inverse of `to_json`."""
    return from_dict(json.loads(text))


def override(cfg: Any, updates: Mapping[str, Any]) -> Any:
    """Returns cfg with dotted keys replaced: override(cfg, {"train.steps": 10, "model": m}).

    Values may be Python values or, for scalar fields, strings to parse as the field's type.
    """
    for key, value in updates.items():
        cfg = _set(cfg, key.split("."), value, key, parse=False)
    return cfg


def _set(node: Any, parts: list[str], value: Any, full: str, *, parse: bool) -> Any:
    cls = type(node)
    name = parts[0]
    fields = _fields(cls)
    if name not in fields:
        raise unknown_key(full, name, cls)
    tp = _hints(cls)[name]
    if len(parts) > 1:
        child = getattr(node, name)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{full}: {name!r} is a value, not a section with sub-keys")
        new = _set(child, parts[1:], value, full, parse=parse)
    elif dataclasses.is_dataclass(tp) or (isinstance(tp, type) and issubclass(tp, ModelSection)):
        new = _section_value(full, value, tp)
    elif parse and isinstance(value, str):
        new = _parse_scalar(full, value, tp)
    else:
        new = _coerce(full, value, tp)
    try:
        return dataclasses.replace(node, **{name: new})
    except TypeError as e:
        raise ConfigError(f"{full}: {e}") from None


def _section_value(path: str, value: Any, tp: type) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value
    if isinstance(value, Mapping):
        return from_dict(value, tp, path)
    if isinstance(value, str) and tp is ModelSection:
        return model_by_name(path, value)
    raise ConfigError(f"{path} is a section; give sub-keys ({path}.KEY=VALUE)")


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Applies command-line overrides 'KEY=VALUE' (KEY dotted, without the 'config.' prefix).

    A whole section set after some of its keys (`model.lora.rank=8` then `model=hf:DIR`) would
    silently drop them: that order is refused, naming both."""
    earlier: dict[str, str] = {}  # section -> the first KEY set under it
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE")
        key, text = item.split("=", 1)
        parts = key.split(".")
        for i in range(1, len(parts)):
            earlier.setdefault(".".join(parts[:i]), key)
        if key in earlier and earlier[key] != key:
            raise ConfigError(
                f"{key}={text} replaces the whole {key} section, which would drop the earlier "
                f"{earlier[key]}=...; put {key}=... first"
            )
        cfg = _set(cfg, parts, text, key, parse=True)
    return cfg


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(overrides as 'KEY=VALUE', the other arguments) from a command line where overrides are
    `--config.KEY=VALUE` or `--config.KEY VALUE`. Raises ConfigError for a key with no value."""
    overrides: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        item = args[i]
        if item.startswith("--config."):
            body = item[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(args):
                    raise ConfigError(f"{item} needs a value: {item}=VALUE")
                body = f"{body}={args[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(item)
        i += 1
    return overrides, rest
