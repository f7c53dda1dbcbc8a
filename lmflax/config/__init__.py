"""lmflax.config: the experiment schema, at the bottom of the library (it imports nothing else
of lmflax).

A config is a tree of frozen dataclasses (`Config` at the root). Config files are Python modules
with `get_config(arg=None)`; `--config.KEY=VALUE` overrides address any field by its dotted path.
Unknown keys and impossible values raise `ConfigError`, which the CLI turns into exit code 2.

    schema.py   the sections, each with `validate()`, and the model-family registry
    parse.py    dicts / JSON / overrides <-> configs
    files.py    config files (`load_config_file`)
    errors.py   ConfigError and the wording helpers (`suggest`, `one_of`)
"""

from lmflax.config.errors import ConfigError, finite_floats, one_of, suggest
from lmflax.config.files import DEFAULT_CONFIG, load_config_file
from lmflax.config.parse import (
    apply_overrides,
    from_dict,
    from_json,
    override,
    split_overrides,
    to_dict,
    to_json,
)
from lmflax.config.schema import (
    DEFAULT_RULES,
    MODEL_FAMILIES,
    Config,
    DataConfig,
    GenerateConfig,
    MeshConfig,
    ModelSection,
    OptimizerConfig,
    TaskConfig,
    TrainConfig,
    model_by_name,
    model_family,
    register_model_family,
    register_model_names,
    validate,
)

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_RULES",
    "MODEL_FAMILIES",
    "Config",
    "ConfigError",
    "DataConfig",
    "GenerateConfig",
    "MeshConfig",
    "ModelSection",
    "OptimizerConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "finite_floats",
    "from_dict",
    "from_json",
    "load_config_file",
    "model_by_name",
    "model_family",
    "one_of",
    "override",
    "register_model_family",
    "register_model_names",
    "split_overrides",
    "suggest",
    "to_dict",
    "to_json",
    "validate",
]
