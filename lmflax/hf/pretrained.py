"""from_pretrained / save_pretrained / init_from: Hugging Face model directories <-> lmflax."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lmflax.config import DEFAULT_RULES, ConfigError
from lmflax.data.hf_tokenizer import HFTokenizer
from lmflax.data.hub import CheckpointError, is_hub_id, model_dir, read_config, read_json
from lmflax.hf import convert, files, lazy
from lmflax.hf.convert import ARCHITECTURES, Architecture
from lmflax.hf.files import WeightSource, find_weights, read_counter, write_json
from lmflax.models.config import ModelConfig
from lmflax.models.seq2seq import EncoderDecoder
from lmflax.nn import unbox
from lmflax.nn.util import as_dtype
from lmflax.parallel import logical_shardings

log = logging.getLogger("lmflax")

HF_SCHEME = "hf:"


@dataclasses.dataclass
class _Checkpoint:
    """A model directory opened for reading: config, architecture, lmflax config, tensors."""

    directory: Path
    hf: dict[str, Any]
    source: WeightSource | None  # None: opened for its config alone (need_weights=False)
    arch: Architecture
    config: ModelConfig
    prefix: str
    num_labels: int | None

    def __enter__(self) -> _Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.source is not None:
            self.source.close()

    @classmethod
    def open(
        cls,
        path: str | Path,
        architecture: str | None = None,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        need_weights: bool = True,
    ) -> _Checkpoint:
        """need_weights=False: a directory with config.json but no weight files opens too,
        its settings read from config.json alone (for planning: the shapes are all it needs;
        tensor names, which only BERT's pooler depends on, are taken as absent)."""
        directory = model_dir(path, revision=revision, subfolder=subfolder)
        hf = read_config(directory)
        where = str(directory / "config.json")
        if architecture is not None or hf.get("architectures"):
            # An unsupported architecture or option is refused from config.json alone, before
            # any weight file is opened (the tensor names only refine the pooler below).
            arch = convert.resolve_architecture(hf, (), architecture, where)
            config = convert.lmflax_config(arch, hf, (), where)
        try:
            weights = find_weights(directory)
        except FileNotFoundError:
            if need_weights or not (architecture is not None or hf.get("architectures")):
                raise
            labels = convert.num_labels_of(hf) if arch.labels is not None else None
            return cls(directory, hf, None, arch, config, arch.base_prefix, labels)
        source = WeightSource(weights)
        try:
            arch = convert.resolve_architecture(hf, source, architecture, where)
            config = convert.lmflax_config(arch, hf, source, where)
            labels = convert.num_labels_of(hf) if arch.labels is not None else None
            prefix = convert.checkpoint_prefix(arch, source)
        except BaseException:
            source.close()
            raise
        return cls(directory, hf, source, arch, config, prefix, labels)

    def layout(self, config: ModelConfig) -> convert.Layout:
        return convert.layout(self.arch, config, self.prefix, self.num_labels)

    def read(
        self, config: ModelConfig, *, strict: bool, lazy: bool = False
    ) -> tuple[dict, list[str]]:
        """{lmflax path: np array} in the unrolled layout, and the unused tensor names.
        lazy: lazy views instead of arrays (lmflax.hf.lazy; nothing read until a block is)."""
        return convert.tensors_to_params(
            self.layout(config),
            self.source.shape,
            self.source.lazy if lazy else self.source.__getitem__,
            list(self.source),
            where=lambda n: str(self.source.file_of(n)),
            strict=strict,
        )


def _dummy_ids() -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


def abstract_params(module: nn.Module) -> dict[str, Any]:
    """The module's parameter tree as ShapeDtypeStructs (nothing allocated)."""
    return unbox(_abstract_boxed(module))


def _abstract_boxed(module: nn.Module) -> dict[str, Any]:
    """The module's parameters as ShapeDtypeStructs in their logical-axis boxes."""
    # An encoder-decoder takes source and target ids; every other model one id array.
    inputs = (_dummy_ids(),) * (2 if isinstance(module, EncoderDecoder) else 1)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, deterministic=True))
    return variables["params"]


def _log_whole(directory: Path, count: int) -> None:
    if count:
        log.info(
            "%s: %d tensors had no strided view through their transform and were read whole "
            "(one at a time)",
            directory,
            count,
        )


def _check_tree(
    got: Mapping[convert.Path_, Any], want: Mapping[convert.Path_, Any], what: str
) -> None:
    missing = [convert.fmt_path(p) for p in want if p not in got]
    extra = [convert.fmt_path(p) for p in got if p not in want]
    shapes = [
        f"{convert.fmt_path(p)}: checkpoint gives {tuple(got[p].shape)}, model expects "
        f"{tuple(want[p].shape)}"
        for p in want
        if p in got and tuple(got[p].shape) != tuple(want[p].shape)
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing parameters: {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected parameters: {', '.join(extra)}")
        parts += shapes
        raise CheckpointError(f"{what}: " + "; ".join(parts))


def _maybe_stack(flat: dict, config: ModelConfig) -> dict:
    """Unrolled layer params -> the scanned layout (`stack_layers`'s, in NumPy: no device
    work per shape) when the config scans its layers."""
    if not config.scan_layers:
        return flat
    groups: dict[convert.Path_, dict[int, Any]] = {}
    out = {}
    for path, value in flat.items():
        at = [i for i, k in enumerate(path) if _LAYER.match(k)]
        if not at:
            out[path] = value
            continue
        i = at[0]
        key = (*path[:i], "layers", *path[i + 1 :])
        groups.setdefault(key, {})[int(path[i].removeprefix("layers_"))] = value
    for key, layers in groups.items():
        out[key] = lazy.stack([layers[i] for i in range(len(layers))])
    return out


_LAYER = re.compile(r"^layers_\d+$")


def from_pretrained(
    path: str | Path,
    *,
    architecture: str | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    revision: str | None = None,
    subfolder: str | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Loads a Hugging Face model (a local directory or a hub id) as an lmflax module and its
    parameters.

    path: a directory with config.json and model.safetensors (or a sharded index, or
    pytorch_model.bin, read without torch), or a hub id ('org/name', 'org/name@revision')
    found in the Hugging Face cache, downloaded first unless HF_HUB_OFFLINE=1 (`revision`,
    `subfolder` as in transformers). architecture: override config.json's
    `architectures[0]` (e.g. 'BertModel' to take only the encoder of a BertForMaskedLM).
    dtype / param_dtype: compute and storage dtypes. overrides: other settings that do not
    change the checkpoint's meaning: scan_layers, remat, attention_impl, dropout_rate,
    attention_dropout_rate, init_std.

    mesh, rules: load straight into the shardings the logical-axis `rules` (default: the
    config's `mesh.rules` defaults, lmflax.config.DEFAULT_RULES) give each parameter on `mesh`
    (a `jax.sharding.Mesh` with axes data/fsdp/tensor, e.g. lmflax.parallel.make_mesh). Each
    tensor is then read block by block: a process reads only the byte runs of the blocks its
    own devices hold (replicated parameters whole, once per process), so no host holds the
    whole model, nor (for sharded parameters) a whole tensor; works across processes under
    jax.distributed. A transform with no strided form reads that one tensor whole on each
    process (lmflax.hf.lazy; none of the shipped families has one).

    Returns (module, params): `module.apply({"params": params}, input_ids, ...,
    deterministic=True)` gives a BertOutput (BertModel), MLM logits [B, T, V]
    (BertForMaskedLM), class logits [B, C] (Bert/RobertaForSequenceClassification), tag
    logits [B, T, C] (*ForTokenClassification), SpanLogits (*ForQuestionAnswering) or LM logits
    [B, T, V] (GPT). RoBERTa / XLM-RoBERTa load as RobertaConfig models, DistilBERT as a
    BertConfig with type_vocab_size=0. Raises FileNotFoundError for a missing directory/file and CheckpointError
    for an unsupported architecture or a tensor whose shape the config does not imply.
    """
    bad = sorted(set(overrides) - set(convert.RUNTIME_FIELDS))
    if bad:
        raise TypeError(
            f"from_pretrained got {', '.join(bad)}: the checkpoint's config.json fixes them; "
            f"accepted overrides: dtype, param_dtype, {', '.join(convert.RUNTIME_FIELDS[2:])}"
        )
    with _Checkpoint.open(path, architecture, revision=revision, subfolder=subfolder) as ckpt:
        config = dataclasses.replace(ckpt.config, dtype=dtype, param_dtype=param_dtype, **overrides)
        errs = config.validate()
        if errs:
            raise CheckpointError(f"{ckpt.directory}: " + "; ".join(errs))
        module = convert.build_module(ckpt.arch, config, ckpt.num_labels)
        whole = read_counter.whole
        flat, unused = ckpt.read(config, strict=True, lazy=mesh is not None)
        if unused:
            log.info(
                "%s: tensors not used by %s: %s", ckpt.directory, ckpt.arch.name, ", ".join(unused)
            )
        flat = _maybe_stack(flat, config)
        pdt = as_dtype(param_dtype)
        if mesh is None:
            want = convert.flatten(abstract_params(module))
            _check_tree(flat, want, str(ckpt.directory))
            params = {p: jnp.asarray(np.asarray(flat[p], dtype=pdt)) for p in want}
            return module, convert.unflatten(params)
        rules = list(DEFAULT_RULES if rules is None else rules)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            boxed = _abstract_boxed(module)
        want = convert.flatten(unbox(boxed))
        _check_tree(flat, want, str(ckpt.directory))
        shardings = convert.flatten(logical_shardings(boxed, mesh, rules))
        # The files stay open while the blocks are read, one tensor after another.
        params = {p: _place(flat[p], pdt, shardings[p]) for p in want}
        _log_whole(ckpt.directory, read_counter.whole - whole)
    return module, convert.unflatten(params)


def model_config(path: str | Path, **overrides: Any) -> ModelConfig:
    """The lmflax model config of a HF model directory, with `init_from='hf:PATH'` so that a
    trainer built from it starts from the checkpoint's weights. overrides: as from_pretrained's
    (dtype, dropout_rate, scan_layers, ...)."""
    bad = sorted(set(overrides) - {*convert.RUNTIME_FIELDS, "init_from"})
    if bad:
        raise TypeError(
            f"model_config got {', '.join(bad)}: the checkpoint's config.json fixes them; "
            f"accepted: {', '.join(convert.RUNTIME_FIELDS)}, init_from"
        )
    with _Checkpoint.open(path, need_weights=False) as ckpt:
        config = ckpt.config
    # A hub id stays an id (portable between machines); a local path becomes absolute.
    source = str(path) if is_hub_id(path) else str(Path(path).expanduser().resolve())
    overrides.setdefault("init_from", f"{HF_SCHEME}{source}")
    return dataclasses.replace(config, **overrides)


# transformers' generation settings that lmflax's decoding does not have; reported, not applied.
_UNSUPPORTED_GENERATION = ("encoder_no_repeat_ngram_size",)


def seq2seq_settings(path: str | Path) -> dict[str, Any]:
    """The config overrides that make lmflax train and decode an encoder-decoder checkpoint as
    transformers does, from its config.json and generation_config.json (which wins):
    task.decoder_start_id (decoder_start_token_id), generate.forced_bos_id /
    forced_eos_id (forced_bos_token_id / forced_eos_token_id), generate.banned_ids
    (single-token bad_words_ids), generate.beam_size / length_penalty (+ length_penalty_form
    'hf') / early_stopping (num_beams, length_penalty, early_stopping) and
    generate.max_new_tokens (max_length - 1: transformers counts the decoder start),
    generate.min_new_tokens (min_new_tokens, or min_length - 1), no_repeat_ngram_size,
    repetition_penalty and encoder_repetition_penalty. A setting lmflax cannot apply
    (encoder_no_repeat_ngram_size) is logged. CheckpointError when the directory names no
    decoder_start_token_id or bans token sequences."""
    directory = model_dir(path)
    hf = dict(read_config(directory))
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        hf.update(read_json(gen_path, "its generation settings"))
    start = hf.get("decoder_start_token_id")
    if not isinstance(start, int):
        raise CheckpointError(
            f"{directory}: no decoder_start_token_id in config.json or generation_config.json "
            f"(got {start!r}); an encoder-decoder checkpoint names the token its decoder starts "
            "from"
        )
    out: dict[str, Any] = {"task.decoder_start_id": start}
    for key, name in (
        ("forced_bos_token_id", "forced_bos_id"),
        ("forced_eos_token_id", "forced_eos_id"),
    ):
        value = hf.get(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        out[f"generate.{name}"] = value if isinstance(value, int) else -1
    bad = hf.get("bad_words_ids") or []
    longer = [b for b in bad if not (isinstance(b, list) and len(b) == 1)]
    if longer:
        raise CheckpointError(
            f"{directory}: bad_words_ids {longer} ban token sequences; lmflax bans single "
            "tokens only"
        )
    out["generate.banned_ids"] = tuple(int(b[0]) for b in bad)
    beams = hf.get("num_beams")
    if isinstance(beams, int) and beams >= 1:
        out["generate.beam_size"] = beams
    if isinstance(hf.get("length_penalty"), int | float):
        out["generate.length_penalty"] = float(hf["length_penalty"])
        out["generate.length_penalty_form"] = "hf"
    early = hf.get("early_stopping")
    if early in (True, False, "never"):
        out["generate.early_stopping"] = str(early).lower()
        out["generate.length_penalty_form"] = "hf"
    if isinstance(hf.get("max_length"), int) and hf["max_length"] > 1:
        out["generate.max_new_tokens"] = hf["max_length"] - 1
    minimum = hf.get("min_new_tokens")
    if not isinstance(minimum, int) and isinstance(hf.get("min_length"), int):
        minimum = hf["min_length"] - 1  # min_length counts the decoder start token
    if isinstance(minimum, int) and minimum > 0:
        out["generate.min_new_tokens"] = minimum
    ngram = hf.get("no_repeat_ngram_size")
    if isinstance(ngram, int) and ngram > 0:
        out["generate.no_repeat_ngram_size"] = ngram
    for name in ("repetition_penalty", "encoder_repetition_penalty"):
        penalty = hf.get(name)
        if isinstance(penalty, int | float) and not isinstance(penalty, bool) and penalty != 1.0:
            out[f"generate.{name}"] = float(penalty)
    ignored = [f"{k}={hf[k]}" for k in _UNSUPPORTED_GENERATION if hf.get(k) not in (None, 0, 1.0)]
    if ignored:
        log.info("%s: generation settings lmflax does not apply: %s", directory, ", ".join(ignored))
    return out


# ---------------------------------------------------------------------------------------------
# init_from: starting a training run from a HF checkpoint


def parse_init_from(spec: str) -> Path:
    """'hf:DIR' -> DIR (ValueError naming the accepted form otherwise)."""
    if not isinstance(spec, str) or not spec.startswith(HF_SCHEME) or len(spec) == len(HF_SCHEME):
        raise ValueError(
            f"model.init_from is {spec!r}; accepted: 'hf:DIR' with DIR a Hugging Face model "
            "directory (config.json + model.safetensors or pytorch_model.bin), or 'hf:ORG/NAME' "
            "(or 'hf:ORG/NAME@REVISION') for a hub id"
        )
    return Path(spec[len(HF_SCHEME) :]).expanduser()


def check_init_from(config: ModelConfig, *, need_weights: bool = True) -> list[str]:
    """Why `config` cannot start from the checkpoint its init_from names (empty = it can):
    missing files, an unsupported architecture, or architecture settings that differ from the
    checkpoint's config.json (each named with both values). need_weights=False (planning)
    asks only for config.json."""
    try:
        directory = parse_init_from(config.init_from)
        with _Checkpoint.open(directory, need_weights=need_weights) as ckpt:
            theirs, arch, hf = ckpt.config, ckpt.arch, ckpt.hf
    except (OSError, ValueError) as e:
        return [f"model.init_from: {e}"]
    family = convert.lmflax_family(arch)
    if config.family != family:
        return [
            f"model.init_from: {directory} holds a {arch.name} (lmflax family {family!r}), but "
            f"the model family is {config.family!r}; use --config.model=hf:{directory}"
        ]
    errs = []
    for field in convert.ARCH_FIELDS:
        if not hasattr(theirs, field):
            continue
        ours, want = getattr(config, field), getattr(theirs, field)
        if ours != want:
            name = field.removeprefix("resolved_").replace("kv_heads", "num_kv_heads")
            verb = "resolves to" if field.startswith("resolved_") else "is"
            errs.append(
                f"model.{name} {verb} {ours!r} but {directory / 'config.json'} has "
                + convert.describe_hf_value(arch.family, field, hf, want)
            )
    if errs:
        errs.append(
            f"(--config.model=hf:{directory} takes the whole model config from the checkpoint)"
        )
    return errs


def init_params(config: ModelConfig, params: Any, shardings: Any = None) -> Any:
    """`params` (a freshly initialised tree of the model being trained) with every parameter the
    checkpoint `config.init_from` has replaced by the checkpoint's value.

    The checkpoint's backbone (the subtree holding `token_embed`) goes into the model's
    backbone wherever it sits (`bert/...` under a head or at the root); head parameters load
    where names and shapes match (an MLM head into an MLM model). Parameters the checkpoint
    lacks (a new task head) keep their fresh values; both lists are logged. shardings: the
    parameters' shardings (a matching tree) to place the loaded values on: each tensor is read
    straight into its sharding, a process reading only the blocks its own devices hold (as
    `from_pretrained(..., mesh=...)` does); without them each is read whole, one at a time.
    """
    directory = parse_init_from(config.init_from)
    errs = check_init_from(config)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    target = convert.flatten(params)
    # The checkpoint's tensors are read lazily, each straight into its parameter's sharding
    # (a process reads the blocks its devices hold), while the files are open.
    with _Checkpoint.open(directory) as ckpt:
        read_config = dataclasses.replace(ckpt.config, scan_layers=False)
        flat, unused = ckpt.read(read_config, strict=True, lazy=True)
        whole = read_counter.whole
        new = _load_into(directory, flat, unused, config, target, shardings)
        _log_whole(directory, read_counter.whole - whole)
    return convert.unflatten(new)


def _load_into(
    directory: Path,
    flat: dict[convert.Path_, Any],
    unused: list[str],
    config: ModelConfig,
    target: dict[convert.Path_, Any],
    shardings: Any,
) -> dict[convert.Path_, Any]:
    """`target` with the checkpoint's values (`flat`, lazy) placed where init_params says."""
    flat = _maybe_stack(flat, config)
    src_root = _backbone_root(flat)
    dst_root = _backbone_root(target)
    mapped: dict[convert.Path_, convert.Path_] = {}
    for path in flat:
        if path[: len(src_root)] == src_root and (len(src_root) or path[0] in _BACKBONE_KEYS):
            mapped[path] = (*dst_root, *path[len(src_root) :])
        else:
            mapped[path] = path
    loaded, errs = [], []
    new = dict(target)
    for src, dst in mapped.items():
        if dst not in target:
            unused.append(convert.fmt_path(src))
            continue
        want = tuple(target[dst].shape)
        if tuple(flat[src].shape) != want:
            errs.append(
                f"parameter {convert.fmt_path(dst)}: checkpoint {directory} gives shape "
                f"{tuple(flat[src].shape)}, the model has {want}"
            )
            continue
        new[dst] = _place(flat[src], target[dst].dtype, _lookup(shardings, dst))
        loaded.append(dst)
    if errs:
        raise CheckpointError("; ".join(errs))
    fresh = [convert.fmt_path(p) for p in target if p not in set(loaded)]
    log.info(
        "init_from %s: loaded %d of %d parameters%s%s",
        directory,
        len(loaded),
        len(target),
        f"; freshly initialised (not in the checkpoint): {', '.join(fresh)}" if fresh else "",
        f"; unused checkpoint tensors: {', '.join(unused)}" if unused else "",
    )
    return new


# A backbone's own top-level parameter groups (BERT and GPT alike have token_embed).
_BACKBONE_KEYS = {
    "token_embed",
    "position_embed",
    "type_embed",
    "embed_norm",
    "encoder",
    "decoder",
    "pooler",
}


def _backbone_root(flat: Mapping[convert.Path_, Any]) -> convert.Path_:
    for path in flat:
        if path[-2:] == ("token_embed", "embedding"):
            return path[:-2]
    raise CheckpointError("no token embedding (token_embed/embedding) among the parameters")


def _lookup(tree: Any, path: convert.Path_) -> Any:
    if tree is None:
        return None
    for k in path:
        tree = tree[k]
    return tree


def _place(value: Any, dtype: Any, sharding: Any) -> jax.Array:
    """`value` (an array or a lazy tensor) as a jax.Array of `dtype` laid out as `sharding`:
    each process reads only the blocks its own devices hold, each distinct block once."""
    if sharding is None:
        whole = tuple(slice(None) for _ in value.shape)
        return jnp.asarray(np.asarray(lazy.read_block(value, whole), dtype=dtype))
    blocks: dict[tuple, np.ndarray] = {}

    def block(index: tuple[slice, ...]) -> np.ndarray:
        # Devices holding the same block (replicas over another mesh axis) share one read.
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            blocks[key] = np.asarray(lazy.read_block(value, index), dtype=dtype)
        return blocks[key]

    return jax.make_array_from_callback(tuple(value.shape), sharding, block)


# ---------------------------------------------------------------------------------------------
# Export


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One lmflax parameter to export: `array` (a jax.Array on any sharding, or a host array),
    or layer `layer` of a scanned stack; brought to the host only when its rule is written."""

    array: Any
    layer: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.array.shape)
        return shape if self.layer is None else shape[1:]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def host(self) -> np.ndarray:
        """The value on this host (every process of a multi-process run calls it in turn: a
        parameter sharded over other processes' devices is all-gathered, this one alone)."""
        x = self.array
        if self.layer is not None:
            x = x[self.layer]
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))


def _export_slots(params: Any) -> dict[convert.Path_, _Slot]:
    """{unrolled lmflax path: _Slot} of a parameter tree (plain or boxed, `{"params": ...}`
    or the inner tree, scanned or unrolled); nothing is copied or gathered."""
    params = unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a nested dict of arrays, got {type(params).__name__}")
    out: dict[convert.Path_, _Slot] = {}
    for path, value in convert.flatten(params).items():
        if "layers" not in path:
            out[path] = _Slot(value)
            continue
        at = path.index("layers")  # a scanned stack: axis 0 is the layer (stack_layers)
        for i in range(value.shape[0]):
            out[(*path[:at], f"layers_{i}", *path[at + 1 :])] = _Slot(value, i)
    return out


def _architecture_of(config: ModelConfig, flat: Mapping[convert.Path_, Any]) -> Architecture:
    for family in convert.FAMILIES.values():
        if family.lmflax_family == config.family:
            name = family.export_as(config, flat)
            if name is not None:
                return ARCHITECTURES[name]
    if config.family == "gpt":
        return ARCHITECTURES["GPT2LMHeadModel"]
    if config.family != "bert":
        families = sorted({"bert", "gpt", *(f.lmflax_family for f in convert.FAMILIES.values())})
        raise CheckpointError(
            f"cannot export model family {config.family!r}; supported: {', '.join(families)}"
        )
    roots = {p[0] for p in flat}
    if "qa_outputs" in roots:
        return ARCHITECTURES["BertForQuestionAnswering"]
    if "classifier" in roots:
        if any(p[-2:] == ("pooler", "kernel") for p in flat):
            return ARCHITECTURES["BertForSequenceClassification"]
        raise CheckpointError(
            "cannot tell which HF head this BERT classifier is: without a pooler it is a token "
            "classifier or a sequence classifier pooling 'first'/'mean' (which HF's "
            "BertForSequenceClassification cannot express); pass "
            "architecture='BertForTokenClassification' to export a token classifier"
        )
    if "transform" in roots or "decoder_bias" in roots:
        return ARCHITECTURES["BertForMaskedLM"]
    return ARCHITECTURES["BertModel"]


def save_pretrained(
    model_config: ModelConfig,
    params: Any,
    path: str | Path,
    *,
    tokenizer: HFTokenizer | None = None,
    architecture: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Writes a Hugging Face model directory: config.json, the weights and, with `tokenizer`,
    its files. `transformers` loads it (AutoModel*.from_pretrained) and computes the same
    outputs as lmflax.

    params: the model's parameters (plain or boxed, `{"params": ...}` or the inner tree,
    scanned or unrolled; host arrays or jax.Arrays on any sharding, across processes too).
    The architecture follows from the config family and the parameters (BertModel,
    BertForMaskedLM, BertForSequenceClassification (with a pooler), BertForQuestionAnswering,
    DistilBertModel (type_vocab_size 0), GPT2LMHeadModel, the Roberta* heads) unless given; a
    BERT token classifier needs architecture='BertForTokenClassification', an XLM-RoBERTa one
    'XLMRoberta...'.

    The weights are streamed tensor by tensor: each parameter is brought to the host (from a
    sharded layout: gathered) when its tensor is written, then freed, so the host holds one
    tensor at a time. They go into `model.safetensors`, or, past `max_shard_size` (bytes, or
    '5GB' / '500MiB' as transformers takes it), into `model-0000k-of-0000n.safetensors` shards
    with `model.safetensors.index.json`. Under jax.distributed every process must call this
    (the gathers are collective); process 0 writes the files.
    """
    slots = _export_slots(params)
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise convert.unsupported(repr(architecture), "save_pretrained")
        arch = ARCHITECTURES[architecture]
    else:
        arch = _architecture_of(model_config, slots)
    if convert.lmflax_family(arch) != model_config.family:
        raise CheckpointError(
            f"cannot export a model of family {model_config.family!r} as {arch.name} (which "
            f"loads as lmflax family {convert.lmflax_family(arch)!r})"
        )
    num_labels = None
    if arch.labels is not None:
        if arch.labels not in slots:
            raise CheckpointError(
                f"{arch.name} needs a {convert.fmt_path(arch.labels)} parameter (its head)"
            )
        num_labels = int(slots[arch.labels].shape[-1])
    config = dataclasses.replace(model_config, scan_layers=False)
    if hasattr(config, "add_pooler"):
        config = dataclasses.replace(
            config, add_pooler=any(p[-2:] == ("pooler", "kernel") for p in slots)
        )
    hf = convert.hf_config(arch, config, num_labels=num_labels)
    prefix = arch.base_prefix if arch.head != "none" else ""
    lay = convert.layout(arch, config, prefix, num_labels)
    rules = convert.export_rules(lay, slots, f"cannot export as {arch.name}")
    files.parse_size(max_shard_size)  # a bad size is refused before anything is written
    specs = {
        name: (np.result_type(*(slots[p].dtype for p in rule.paths)), shape)
        for rule in rules
        for name, shape in zip(rule.hf, rule.hf_shapes)
    }

    def tensors() -> Any:
        for rule in rules:
            converted = convert.rule_to_hf(rule, [slots[p].host() for p in rule.paths])
            for name, tensor in converted.items():
                yield name, tensor.astype(specs[name][0], copy=False)
            del converted

    out = Path(path).expanduser()
    writer = jax.process_index() == 0
    if tokenizer is not None:
        # The model config names the special tokens' ids as the tokenizer has them.
        pad = getattr(config, "pad_token_id", None)
        if pad is not None and tokenizer.token_id("pad_token") not in (None, pad):
            raise CheckpointError(
                f"cannot export as {arch.name}: the tokenizer pads with id "
                f"{tokenizer.token_id('pad_token')}, but model.pad_token_id is {pad} (RoBERTa's "
                "positions skip exactly the pad_token_id tokens)"
            )
        for key in ("pad_token", "bos_token", "eos_token"):
            token_id = tokenizer.token_id(key)
            if token_id is not None:
                hf[f"{key}_id"] = token_id
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None:
            tokenizer.save(out)
        write_json(out / "config.json", hf)
    files.write_safetensors_stream(out, specs, tensors(), max_shard_size, write=writer)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lmflax.hf.save_pretrained")
    return out
