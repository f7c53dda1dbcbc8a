"""The one place a config is checked against the rest of the library.

`Config.validate()` (lmflax.config) judges each section alone and the sections against each
other; `resolve` adds what needs other layers: the task name is a registered task, the metric
names are known, and a `model.init_from='hf:DIR'` checkpoint exists and agrees with the model
settings. The CLI calls it once; `Trainer.create` calls it too, and a config already resolved
in this process is not checked again.
"""

from __future__ import annotations

import functools
from pathlib import Path

from lmflax.config import Config, ConfigError, one_of, suggest
from lmflax.data.tokenizers import KINDS, min_vocab_size
from lmflax.evaluate.generation import METRICS
from lmflax.hf import check_init_from
from lmflax.tasks import TASKS
from lmflax.train.metrics import plugin_problems


def resolve(cfg: Config, *, need_weights: bool = True) -> Config:
    """Returns `cfg` if it can run; raises ConfigError listing every problem otherwise.
    need_weights=False (the planner): a model.init_from checkpoint needs only its config.json,
    so a run can be planned from the shapes before its weights are downloaded."""
    try:
        return _resolve_cached(cfg, need_weights)
    except TypeError:  # an unhashable value somewhere in a hand-built config: no caching
        return _resolve(cfg, need_weights)


@functools.lru_cache(maxsize=32)
def _resolve_cached(cfg: Config, need_weights: bool) -> Config:
    return _resolve(cfg, need_weights)


def _resolve(cfg: Config, need_weights: bool = True) -> Config:
    errs: list[str] = []
    try:
        cfg.validate()
    except ConfigError as e:
        errs += str(e).split("\n  ")[1:]
    one_of(errs, "task.name", cfg.task.name, sorted(TASKS))
    for m in cfg.task.metrics:
        one_of(errs, "task.metrics entry", m, METRICS)
    if getattr(cfg.model, "init_from", None) is not None:
        errs += check_init_from(cfg.model, need_weights=need_weights)
    errs += plugin_problems(cfg.train.writers)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    return cfg


def check_run(cfg: Config) -> None:
    """What only a training run needs, checked before it starts (before the workdir is
    created or a tokenizer trained): data.tokenizer names a kind, 'hf:DIR' or a file that
    exists, and a tokenizer trained for the run fits model.vocab_size. (`resolve` does not
    check these: a model can be built, planned or stepped on token ids without a tokenizer.)
    Raises ConfigError."""
    errs = _tokenizer_problems(cfg)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


def _tokenizer_problems(cfg: Config) -> list[str]:
    if cfg.model.family == "word2vec" or cfg.task.name not in TASKS:
        return []  # word2vec counts its own vocabulary
    kind = cfg.data.tokenizer or TASKS[cfg.task.name].default_tokenizer
    if kind not in KINDS and not kind.startswith("hf:") and not Path(kind).is_file():
        return [
            f"data.tokenizer={kind!r} is neither a tokenizer kind nor a file"
            f"{suggest(kind, KINDS)}; accepted: {', '.join(repr(k) for k in KINDS)}, a "
            "tokenizer.json path, or 'hf:DIR'"
        ]
    vocab_size = getattr(cfg.model, "vocab_size", None)
    if kind not in KINDS or not isinstance(vocab_size, int):
        return []
    least = min_vocab_size(kind)
    if vocab_size < least:
        return [
            f"model.vocab_size={vocab_size} is smaller than any {kind!r} tokenizer "
            f"(data.tokenizer) can be: it has at least {least} tokens; set model.vocab_size "
            f">= {least}"
        ]
    return []
