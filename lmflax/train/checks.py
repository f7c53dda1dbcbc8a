"""The one place a config is checked against the rest of the library.

`Config.validate()` (lmflax.config) judges each section alone and the sections against each
other; `resolve` adds what needs other layers: the task name is a registered task, the metric
names are known, and a `model.init_from='hf:DIR'` checkpoint exists and agrees with the model
settings. The CLI calls it once; `Trainer.create` calls it too, and a config already resolved
in this process is not checked again.
"""

from __future__ import annotations

import functools

from lmflax.config import Config, ConfigError, one_of
from lmflax.evaluate.generation import METRICS
from lmflax.hf import check_init_from
from lmflax.tasks import TASKS
from lmflax.train.metrics import plugin_problems


def resolve(cfg: Config) -> Config:
    """Returns `cfg` if it can run; raises ConfigError listing every problem otherwise."""
    try:
        return _resolve_cached(cfg)
    except TypeError:  # an unhashable value somewhere in a hand-built config: no caching
        return _resolve(cfg)


@functools.lru_cache(maxsize=32)
def _resolve_cached(cfg: Config) -> Config:
    return _resolve(cfg)


def _resolve(cfg: Config) -> Config:
    errs: list[str] = []
    try:
        cfg.validate()
    except ConfigError as e:
        errs += str(e).split("\n  ")[1:]
    one_of(errs, "task.name", cfg.task.name, sorted(TASKS))
    for m in cfg.task.metrics:
        one_of(errs, "task.metrics entry", m, METRICS)
    if getattr(cfg.model, "init_from", None) is not None:
        errs += check_init_from(cfg.model)
    errs += plugin_problems(cfg.train.writers)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    return cfg
