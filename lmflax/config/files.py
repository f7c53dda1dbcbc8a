"""Config files: Python modules with `get_config(arg=None)` returning a `Config` (or a nested
dict for `from_dict`). `load_config_file('FILE[:ARG]')` imports one; a bare name such as
'bert_tiny' is looked up among the shipped configs."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from lmflax.config.errors import ConfigError, suggest
from lmflax.config.parse import from_dict, unknown_key
from lmflax.config.schema import (
    MODEL_FAMILIES,
    Config,
    DataConfig,
    GenerateConfig,
    MeshConfig,
    OptimizerConfig,
    TaskConfig,
    TrainConfig,
)

# The shipped configs are a subpackage (lmflax/configs, also reachable as the repository's
# configs/ link), so they are addressable by name from an installed wheel too.
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = SHIPPED_CONFIGS / "gpt_tiny.py"


def shipped_configs() -> list[str]:
    """The names of the shipped configs ('gpt_tiny', 'finetune/sst2_roberta', ...)."""
    return sorted(
        p.relative_to(SHIPPED_CONFIGS).with_suffix("").as_posix()
        for p in SHIPPED_CONFIGS.rglob("*.py")
        if not p.name.startswith("_")
    )


def load_config_file(spec: str | None) -> tuple[Config, str]:
    """Loads 'FILE' or 'FILE:ARG' (get_config(ARG)). Returns the config and its name (file stem).

    A bare name such as 'bert_tiny' (or 'finetune/NAME') is looked up among the shipped configs.
    """
    spec = spec or str(DEFAULT_CONFIG)
    path_text, _, arg = spec.partition(":")
    path = Path(path_text)
    if not path.exists() and not path.suffix:
        candidate = SHIPPED_CONFIGS / f"{path_text}.py"
        if candidate.exists():
            path = candidate
    if not path.exists():
        shipped = shipped_configs()
        raise ConfigError(
            f"config file {path_text!r} does not exist{suggest(path.stem, shipped)} "
            f"(shipped configs: {', '.join(shipped)})"
        )
    # Config files may import their siblings (`from configs import gpt_tiny`).
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module_name = "_lmflax_config_" + re.sub(r"\W", "_", path.stem)
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ConfigError:
        raise
    except TypeError as e:
        raise _type_error(path, e) from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except TypeError as e:
        raise _type_error(path, e) from None
    if isinstance(cfg, Mapping):
        cfg = from_dict(cfg)
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected Config")
    return cfg, path.stem


def _type_error(path: Path, e: TypeError) -> ConfigError:
    """Dataclass constructors reject unknown keyword arguments with a TypeError; name the key."""
    m = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(e))
    if m:
        cls_name, key = m.groups()
        for cls in [
            Config,
            TaskConfig,
            DataConfig,
            TrainConfig,
            OptimizerConfig,
            MeshConfig,
            GenerateConfig,
            *MODEL_FAMILIES.values(),
        ]:
            if cls.__name__ == cls_name:
                return ConfigError(f"{path}: {unknown_key(key, key, cls)}")
    return ConfigError(f"{path}: {e}")
