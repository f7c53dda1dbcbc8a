"""Typed, frozen, validated experiment configs.

A config is a tree of frozen dataclasses (`Config` at the root). Config files in `configs/` are
Python modules with `get_config(arg=None)` returning a `Config` (or a nested dict of overrides
applied to the defaults). `--config.KEY=VALUE` overrides address any field by its dotted path.
Unknown keys and impossible values raise `ConfigError`, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from lmflax.nn.attention import IMPLEMENTATIONS
from lmflax.nn.blocks import REMAT_POLICIES, StackConfig, remat_policy
from lmflax.nn.feedforward import ACTIVATIONS
from lmflax.nn.norms import NORMS


class ConfigError(ValueError):
    """A config that cannot run: an unknown key or an impossible value. The CLI exits with 2."""


# ---------------------------------------------------------------------------------------------
# The tree


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(StackConfig):
    """A model: a stack plus its vocabulary and positions. Families subclass it.

    position: 'learned' (a [max_len, D] table), 'sinusoidal' (the fixed table), 'rope' (rotary,
    in attention), or 'none'.
    init_from: 'hf:DIR' starts training from the weights of a Hugging Face model directory
    (lmflax.hf); the architecture settings must match its config.json (`model=hf:DIR` takes
    them from it).
    """

    family: ClassVar[str] = ""
    vocab_size: int = 4096
    max_len: int = 512
    position: str = "learned"
    rope_fraction: float = 1.0
    tie_embeddings: bool = True
    init_from: str | None = None

    def validate(self) -> list[str]:
        """Returns the problems of this model config as messages (empty = valid)."""
        errs = []
        for name in ("num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "max_len"):
            if getattr(self, name) <= 0:
                errs.append(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads > 0 and self.head_dim is None and self.d_model % self.num_heads:
            errs.append(
                f"model.num_heads ({self.num_heads}) must divide model.d_model ({self.d_model}) "
                "(or set model.head_dim)"
            )
        kv = self.num_kv_heads
        if kv is not None and (kv <= 0 or self.num_heads % kv):
            errs.append(
                f"model.num_kv_heads ({kv}) must divide model.num_heads ({self.num_heads}); "
                "None means num_heads"
            )
        if self.head_dim is not None and self.head_dim <= 0:
            errs.append(f"model.head_dim must be > 0 or None, got {self.head_dim}")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                errs.append(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        _one_of(errs, "model.activation", self.activation, ACTIVATIONS)
        _one_of(errs, "model.norm", self.norm, NORMS)
        _one_of(errs, "model.norm_position", self.norm_position, ("pre", "post"))
        _one_of(errs, "model.position", self.position, ("learned", "sinusoidal", "rope", "none"))
        _one_of(errs, "model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _one_of(errs, "model.param_dtype", self.param_dtype, ("float32", "bfloat16", "float16"))
        _one_of(errs, "model.attention_impl", self.attention_impl, (None, *IMPLEMENTATIONS))
        if self.remat not in REMAT_POLICIES:
            try:
                remat_policy(self.remat)
            except ValueError as e:
                errs.append(f"model.remat: {e}")
        if self.position == "rope" and (self.rope_base is None or self.rope_base <= 0):
            errs.append("model.position='rope' needs model.rope_base > 0 (e.g. 10000.0)")
        if self.position != "rope" and self.rope_base is not None:
            errs.append(
                f"model.rope_base={self.rope_base} is only used with model.position='rope', "
                f"but position is {self.position!r}"
            )
        if self.init_from is not None:
            from lmflax.hf import check_init_from  # reads DIR/config.json

            errs.extend(check_init_from(self))
        return errs


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What the model is trained to do.

    name: 'causal_lm' (next-token prediction, GPT) or 'mlm' (BERT masked language modelling:
    mlm_probability of the tokens are chosen; of those mask_prob become [MASK], random_prob a
    random token, the rest stay), or 'seq2seq' (an encoder-decoder maps a record's source_key
    text, data.seq_len tokens at most, to its target_key text, target_len tokens at most; the
    generated text is scored with `metrics`, 'bleu' and/or 'rouge', at the end).

    loss_chunk_size: 0 computes the full [B, T, V] logits; N > 0 computes the loss N positions
    (of every row) at a time with `chunked_cross_entropy`, which never holds the full float32
    logits and needs no recomputation in the backward pass (less memory, same values).
    mlm_max_predictions: 0 applies the MLM output layer at every position; K > 0 gathers the (at
    most) K chosen positions of each row first, as BERT's max_predictions_per_seq does (chosen
    positions beyond K are left out of the loss and counted in the 'mlm_dropped' metric).
    Fine-tuning (lmflax.tasks.classification / tagging / qa): num_labels is the head's output
    size and must equal the dataset's classes (or BIO tags); pooling is 'pooled' or 'first'
    ([CLS]) or 'mean' for BERT, 'last' (last real token) or 'mean' for GPT, 'auto' = pooled /
    last. QA: questions are cut to max_query_len tokens, contexts split into windows starting
    doc_stride tokens apart, answers at most max_answer_len tokens long.
    """

    name: str = "causal_lm"
    mlm_probability: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1
    loss_chunk_size: int = 0
    mlm_max_predictions: int = 0
    num_labels: int = 2
    pooling: str = "auto"
    max_query_len: int = 64
    doc_stride: int = 128
    max_answer_len: int = 30
    source_key: str = "inputs"
    target_key: str = "targets"
    target_len: int = 128
    metrics: tuple[str, ...] = ("bleu",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """How text is generated (`train.py --generate`, and seq2seq's evaluation after training).

    beam_size > 1: beam search with GNMT's length_penalty alpha. beam_size 1: sampling with
    temperature (0 = greedy), top_k (0 = off) and top_p (1.0 = off). max_new_tokens: 0 = the
    task's default (task.target_len for seq2seq, train.sample_tokens for a causal LM).
    eval_examples: examples of data.eval_split decoded and scored after training (0 = none);
    their predictions are written to workdir/predictions.jsonl.
    """

    beam_size: int = 1
    length_penalty: float = 0.6
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 0
    eval_examples: int = 64
    seed: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where batches come from.

    dataset: a TFDS name ('lmflax_pystdlib', the embedded corpus built on first use from the
    Python standard library; or any TFDS text dataset prepared in array_record format, e.g.
    'lm1b', 'c4/en', 'wikipedia/20230601.en'). tokenizer: 'bpe' (byte-level BPE) or 'wordpiece'
    trained on the training split and cached under data_dir, or a path to a tokenizer.json, or
    'hf:DIR' for a Hugging Face model directory. batch_size is global (all processes).
    num_shards: the global batch is read as this many data shards (0 = one per process when a
    run starts; a resumed run keeps its checkpoint's count). The data depends on it, never on the
    process count or mesh; see lmflax.data.shards.
    """

    dataset: str = "lmflax_pystdlib"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_key: str = "text"
    tokenizer: str = "bpe"
    tokenizer_train_docs: int = 20000
    batch_size: int = 16
    seq_len: int = 128
    shuffle_buffer: int = 1024
    prefetch_threads: int = 1
    download: bool = False
    num_shards: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: how long, how often to log/evaluate/checkpoint, what to print at the end.

    checkpoint_every=0 saves only at the end; eval_every=0 evaluates only at the end.
    Retention: the newest keep_checkpoints checkpoints survive, plus every step that is a multiple
    of keep_every (0 = none). verify_checkpoints checks each checkpoint's recorded SHA-256 sums
    before restoring it. nonfinite: what a NaN/Inf loss or gradient does — 'stop' (exit non-zero,
    naming the step) or 'skip' (the update is dropped, parameters and optimizer state stay
    bit-for-bit unchanged, and the skips are counted in the metrics); either way no update from a
    non-finite step is ever applied or saved.
    sample_tokens tokens are generated from sample_prompt at the end (0 = no sample).
    """

    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    keep_every: int = 0
    verify_checkpoints: bool = True
    nonfinite: str = "stop"
    eval_every: int = 0
    eval_steps: int = 10
    sample_prompt: str = "def "
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    progress: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with linear warm-up then `schedule` ('cosine', 'linear' or 'constant') decay to
    min_lr_ratio · learning_rate at the last step; global-norm clipping at clip_norm (0 = off);
    weight decay on kernels and embeddings only (never norms or biases); gradient accumulation
    over grad_accum_steps micro-batches of batch_size / grad_accum_steps.
    name: 'adamw', or 'sgd' (plain SGD, word2vec's optimizer; b1, b2 and eps unused).
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum_steps: int = 1


DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Activations' batch axis goes over both data-parallel axes. Rules are applied in order and a
    # mesh axis is used once per array, so in an activation (batch, length, embed) `embed` finds
    # fsdp taken by batch and stays unsharded, while a parameter (vocab, embed) gets fsdp.
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("kv", None),
    ("positions", None),
    ("token_types", None),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh axes (data, fsdp, tensor); one may be -1 = all remaining devices.

    rules map logical axis names (used by every parameter and activation) to mesh axes.
    memory_budget_gib: per-device memory (GiB) the compiled train step may use; a config that
    needs more is refused before anything is allocated (0 = unchecked). See lmflax.plan.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
    memory_budget_gib: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The whole experiment."""

    model: ModelConfig
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)


# ---------------------------------------------------------------------------------------------
# Model families

MODEL_FAMILIES: dict[str, type[ModelConfig]] = {}


def register_model_config(cls: type[ModelConfig]) -> type[ModelConfig]:
    """Class decorator: makes a ModelConfig subclass loadable by its `family` name."""
    if not cls.family:
        raise ValueError(f"{cls.__name__} needs a non-empty `family` class attribute")
    MODEL_FAMILIES[cls.family] = cls
    return cls


def _families() -> dict[str, type[ModelConfig]]:
    import lmflax.models  # noqa: F401  (registers the families)

    return MODEL_FAMILIES


# ---------------------------------------------------------------------------------------------
# Building, overriding, serialising


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown_key(path: str, key: str, cls: type) -> ConfigError:
    names = sorted(_fields(cls))
    return ConfigError(
        f"unknown config key {path!r}{_suggest(key, names)} "
        f"(valid keys of {cls.__name__}: {', '.join(names)})"
    )


def _one_of(errs: list[str], name: str, value: Any, accepted: Iterable[Any]) -> None:
    accepted = tuple(accepted)
    if value not in accepted:
        hint = (
            _suggest(value, [a for a in accepted if isinstance(a, str)])
            if isinstance(value, str)
            else ""
        )
        errs.append(f"{name} is {value!r}{hint}; accepted: {', '.join(repr(a) for a in accepted)}")


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
    if cls is ModelConfig:
        family = data.pop("family", None)
        families = _families()
        if family not in families:
            raise ConfigError(
                f"{path}.family is {family!r}{_suggest(str(family), families)}; "
                f"accepted: {', '.join(sorted(families))}"
            )
        cls = families[family]
    fields = _fields(cls)
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else key
        if key not in fields:
            raise _unknown_key(sub, key, cls)
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
    if isinstance(cfg, ModelConfig):
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
        raise _unknown_key(full, name, cls)
    tp = _hints(cls)[name]
    if len(parts) > 1:
        child = getattr(node, name)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{full}: {name!r} is a value, not a section with sub-keys")
        new = _set(child, parts[1:], value, full, parse=parse)
    elif dataclasses.is_dataclass(tp) or (isinstance(tp, type) and issubclass(tp, ModelConfig)):
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
    if isinstance(value, str) and value.startswith("hf:") and tp is ModelConfig:
        from lmflax.hf import model_config

        try:
            return model_config(value[3:])
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}={value!r}: {e}") from None
    if isinstance(value, str) and tp is ModelConfig:
        from lmflax.models import PRESETS

        if value not in PRESETS:
            raise ConfigError(
                f"{path}={value!r} is not a model preset{_suggest(value, PRESETS)}; "
                f"accepted: {', '.join(sorted(PRESETS))}, or hf:DIR (a Hugging Face model directory)"
            )
        return PRESETS[value]
    raise ConfigError(f"{path} is a section; give sub-keys ({path}.KEY=VALUE)")


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Applies command-line overrides 'KEY=VALUE' (KEY dotted, without the 'config.' prefix)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE")
        key, text = item.split("=", 1)
        cfg = _set(cfg, key.split("."), text, key, parse=True)
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading config files

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "gpt_tiny.py"


def load_config_file(spec: str | None) -> tuple[Config, str]:
    """Loads 'FILE' or 'FILE:ARG' (get_config(ARG)). Returns the config and its name (file stem).

    A bare preset name such as 'bert_tiny' is looked up in the repository's configs/ folder.
    """
    spec = spec or str(DEFAULT_CONFIG)
    path_text, _, arg = spec.partition(":")
    path = Path(path_text)
    if not path.exists() and not path.suffix:
        candidate = DEFAULT_CONFIG.parent / f"{path_text}.py"
        if candidate.exists():
            path = candidate
    if not path.exists():
        shipped = sorted(
            p.stem for p in DEFAULT_CONFIG.parent.glob("*.py") if not p.stem.startswith("_")
        )
        raise ConfigError(
            f"config file {path_text!r} does not exist{_suggest(path.stem, shipped)} "
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
            *_families().values(),
        ]:
            if cls.__name__ == cls_name:
                return ConfigError(f"{path}: {_unknown_key(key, key, cls)}")
    return ConfigError(f"{path}: {e}")


# ---------------------------------------------------------------------------------------------
# Validation


def validate(cfg: Config) -> Config:
    """Raises ConfigError listing every impossible value; returns cfg unchanged if it is valid.

    Checks that need the device count live in `validate_devices`.
    """
    errs = cfg.model.validate()
    d, t, o, m, k = cfg.data, cfg.train, cfg.optimizer, cfg.mesh, cfg.task
    if d.batch_size <= 0:
        errs.append(f"data.batch_size must be > 0, got {d.batch_size}")
    if d.seq_len <= 0:
        errs.append(f"data.seq_len must be > 0, got {d.seq_len}")
    if d.num_shards < 0:
        errs.append(f"data.num_shards must be >= 0 (0 = one per process), got {d.num_shards}")
    elif d.num_shards and d.batch_size > 0 and d.batch_size % d.num_shards:
        errs.append(
            f"data.batch_size ({d.batch_size}) must be divisible by data.num_shards "
            f"({d.num_shards})"
        )
    elif cfg.model.position in ("learned", "sinusoidal") and d.seq_len > cfg.model.max_len:
        errs.append(
            f"data.seq_len ({d.seq_len}) is longer than the model's {cfg.model.position} "
            f"positions (model.max_len={cfg.model.max_len})"
        )
    if t.steps <= 0:
        errs.append(f"train.steps must be > 0, got {t.steps}")
    for name in ("log_every", "eval_steps"):
        if getattr(t, name) <= 0:
            errs.append(f"train.{name} must be > 0, got {getattr(t, name)}")
    for name in ("checkpoint_every", "eval_every", "sample_tokens"):
        if getattr(t, name) < 0:
            errs.append(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if t.keep_checkpoints <= 0:
        errs.append(f"train.keep_checkpoints must be > 0, got {t.keep_checkpoints}")
    if t.keep_every < 0:
        errs.append(f"train.keep_every must be >= 0 (0 = off), got {t.keep_every}")
    _one_of(errs, "train.nonfinite", t.nonfinite, ("stop", "skip"))
    if t.sample_temperature < 0:
        errs.append(f"train.sample_temperature must be >= 0, got {t.sample_temperature}")
    if o.learning_rate <= 0:
        errs.append(f"optimizer.learning_rate must be > 0, got {o.learning_rate}")
    if o.warmup_steps < 0:
        errs.append(f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}")
    _one_of(errs, "optimizer.schedule", o.schedule, ("cosine", "linear", "constant"))
    _one_of(errs, "optimizer.name", o.name, ("adamw", "sgd"))
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        errs.append(f"optimizer.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if o.weight_decay < 0 or o.clip_norm < 0 or o.eps <= 0:
        errs.append(
            "optimizer.weight_decay and clip_norm must be >= 0 and eps > 0, got "
            f"{o.weight_decay}, {o.clip_norm}, {o.eps}"
        )
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        errs.append(f"optimizer.b1 and b2 must be in [0, 1), got {o.b1}, {o.b2}")
    if o.grad_accum_steps <= 0:
        errs.append(f"optimizer.grad_accum_steps must be > 0, got {o.grad_accum_steps}")
    elif d.batch_size % o.grad_accum_steps:
        errs.append(
            f"data.batch_size ({d.batch_size}) must be divisible by optimizer.grad_accum_steps "
            f"({o.grad_accum_steps})"
        )
    sizes = {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            errs.append(f"mesh.{name} must be >= 1 or -1 (the rest), got {size}")
    if m.memory_budget_gib < 0:
        errs.append(
            f"mesh.memory_budget_gib must be >= 0 (0 = unchecked), got {m.memory_budget_gib}"
        )
    if sum(s == -1 for s in sizes.values()) > 1:
        errs.append(f"at most one mesh axis may be -1, got {sizes}")
    for rule in m.rules:
        if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
            errs.append(f"mesh.rules entries are (logical_name, mesh_axes) pairs, got {rule!r}")
            continue
        axes = rule[1] if isinstance(rule[1], tuple) else (rule[1],)
        for ax in axes:
            if ax is not None and ax not in sizes:
                errs.append(
                    f"mesh.rules maps {rule[0]!r} to unknown mesh axis {ax!r}; accepted: data, fsdp, tensor"
                )
    _one_of(errs, "task.name", k.name, _tasks())
    if not 0.0 < k.mlm_probability < 1.0:
        errs.append(f"task.mlm_probability must be in (0, 1), got {k.mlm_probability}")
    if k.mask_prob < 0 or k.random_prob < 0 or k.mask_prob + k.random_prob > 1:
        errs.append(
            f"task.mask_prob + task.random_prob must be within [0, 1], got {k.mask_prob} + {k.random_prob}"
        )
    for name in ("loss_chunk_size", "mlm_max_predictions"):
        if getattr(k, name) < 0:
            errs.append(f"task.{name} must be >= 0 (0 = off), got {getattr(k, name)}")
    if k.mlm_max_predictions and k.name != "mlm":
        errs.append(f"task.mlm_max_predictions is for task 'mlm', but task.name is {k.name!r}")
    if k.mlm_max_predictions > d.seq_len:
        errs.append(
            f"task.mlm_max_predictions ({k.mlm_max_predictions}) is more than data.seq_len "
            f"({d.seq_len}) positions"
        )
    errs += _generation_errors(cfg)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    return cfg


def _generation_errors(cfg: Config) -> list[str]:
    from lmflax.evaluate.generation import METRICS

    errs = []
    k, g = cfg.task, cfg.generate
    if k.target_len <= 0:
        errs.append(f"task.target_len must be > 0, got {k.target_len}")
    for m in k.metrics:
        _one_of(errs, "task.metrics entry", m, METRICS)
    if g.beam_size < 1:
        errs.append(f"generate.beam_size must be >= 1, got {g.beam_size}")
    if g.temperature < 0:
        errs.append(f"generate.temperature must be >= 0, got {g.temperature}")
    if g.top_k < 0:
        errs.append(f"generate.top_k must be >= 0 (0 = off), got {g.top_k}")
    if not 0.0 < g.top_p <= 1.0:
        errs.append(f"generate.top_p must be in (0, 1] (1 = off), got {g.top_p}")
    for name in ("max_new_tokens", "eval_examples"):
        if getattr(g, name) < 0:
            errs.append(f"generate.{name} must be >= 0, got {getattr(g, name)}")
    return errs


def _tasks() -> tuple[str, ...]:
    from lmflax.tasks import TASKS

    return tuple(sorted(TASKS))


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Mesh sizes with the -1 axis filled in; ConfigError if they cannot tile the devices."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    known = 1
    for s in sizes.values():
        if s != -1:
            known *= s
    if -1 in sizes.values():
        if num_devices % known:
            raise ConfigError(
                f"mesh sizes {sizes}: the fixed axes' product {known} does not divide the "
                f"{num_devices} devices"
            )
        sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    elif known != num_devices:
        raise ConfigError(
            f"mesh data×fsdp×tensor = {sizes['data']}×{sizes['fsdp']}×{sizes['tensor']} = {known} "
            f"but there are {num_devices} devices; make the product {num_devices} or set one axis to -1"
        )
    return sizes


def validate_devices(cfg: Config, num_devices: int) -> dict[str, int]:
    """Device-count checks (mesh tiling, batch divisibility); returns the resolved mesh sizes."""
    sizes = resolve_mesh_shape(cfg.mesh, num_devices)
    dp = sizes["data"] * sizes["fsdp"]
    micro = cfg.data.batch_size // cfg.optimizer.grad_accum_steps
    if micro % dp:
        raise ConfigError(
            f"the global batch (data.batch_size={cfg.data.batch_size}"
            + (
                f" / grad_accum_steps={cfg.optimizer.grad_accum_steps} = {micro}"
                if cfg.optimizer.grad_accum_steps > 1
                else ""
            )
            + f") must be divisible by the data-parallel size data×fsdp = {dp}"
        )
    return sizes
