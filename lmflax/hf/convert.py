"""Hugging Face <-> lmflax: the supported architectures, their configs and parameter layouts.

Each architecture is described once, as `Rule`s: a rule ties one or more checkpoint tensors to
one or more lmflax parameters, with the shapes on both sides and the two transforms. Loading,
exporting and every error message read the same rules, so the two directions cannot drift.

Layouts: torch `nn.Linear` weights are [out, in] (lmflax `Linear` kernels are [in, out]);
GPT-2's `Conv1D` weights are already [in, out]; lmflax attention kernels are q/k/v [D, N, H]
and out [N, H, D]; GPT-2 fuses q, k and v into one `c_attn` [D, 3D].
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from lmflax.hf import lazy
from lmflax.hf.files import CheckpointError
from lmflax.models import (
    GPT,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPTConfig,
)
from lmflax.models.config import ModelConfig

Path_ = tuple[str, ...]

# HF `hidden_act` / `activation_function` names <-> lmflax activations.
ACT_FROM_HF = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A supported HF architecture: its family (config mapping) and head."""

    name: str
    family: str  # the HF model_type: "bert", "gpt2", or a registered family's
    head: str  # "none", "mlm", "classifier", "tagger", "qa", "lm"
    base_prefix: str  # the base model's name prefix when a head wraps it
    # The lmflax parameter whose last dimension is the number of labels (heads with labels).
    labels: tuple[str, ...] | None = None


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("BertModel", "bert", "none", "bert."),
        Architecture("BertForMaskedLM", "bert", "mlm", "bert."),
        # BERT's pretraining checkpoints (bert-base-uncased): MLM head + next-sentence head; the
        # NSP head is not used by lmflax and is reported as unused.
        Architecture("BertForPreTraining", "bert", "mlm", "bert."),
        Architecture(
            "BertForSequenceClassification", "bert", "classifier", "bert.", ("classifier", "kernel")
        ),
        Architecture(
            "BertForTokenClassification", "bert", "tagger", "bert.", ("classifier", "kernel")
        ),
        Architecture("BertForQuestionAnswering", "bert", "qa", "bert."),
        Architecture("GPT2Model", "gpt2", "none", "transformer."),
        Architecture("GPT2LMHeadModel", "gpt2", "lm", "transformer."),
    )
}


@dataclasses.dataclass(frozen=True)
class Family:
    """A HF model_type converted by its own module (e.g. lmflax.hf.llama), registered with
    `register_family`: every function below hands that model_type's architectures to it."""

    model_type: str
    lmflax_family: str  # the lmflax model family its configs are ("gpt", "bert", ...)
    anchor: str  # a backbone tensor name after the base prefix, e.g. "embed_tokens.weight"
    config: Callable[[Architecture, Mapping[str, Any], Iterable[str], str], ModelConfig]
    hf_config: Callable[[Architecture, ModelConfig, int | None], dict[str, Any]]
    layout: Callable[[Architecture, ModelConfig, str, int | None], Layout]
    build: Callable[[Architecture, ModelConfig, int | None], nn.Module]
    describe: Callable[[str, Mapping[str, Any], Any], str]
    # The architecture name to export a model of `lmflax_family` as, or None (not this family's).
    export_as: Callable[[ModelConfig, Mapping[Path_, Any]], str | None]
    # The architecture of a checkpoint whose config.json lists none, from its tensor names;
    # None: the family's first registered architecture with a head.
    infer: Callable[[set[str]], str] | None = None


FAMILIES: dict[str, Family] = {}


def register_family(family: Family, architectures: Iterable[Architecture]) -> None:
    """Adds a HF model_type and its architectures to the registry."""
    FAMILIES[family.model_type] = family
    for arch in architectures:
        ARCHITECTURES[arch.name] = arch


def lmflax_family(arch: Architecture) -> str:
    """The lmflax model family an architecture loads as."""
    if arch.family in FAMILIES:
        return FAMILIES[arch.family].lmflax_family
    return {"bert": "bert", "gpt2": "gpt"}[arch.family]


def unsupported(what: str, source: str) -> CheckpointError:
    types = sorted({a.family for a in ARCHITECTURES.values()})
    return CheckpointError(
        f"{source}: architecture {what} is not supported; supported: "
        f"{', '.join(ARCHITECTURES)} (model_type {', '.join(repr(t) for t in types)})"
    )


def resolve_architecture(
    hf: Mapping[str, Any], names: Iterable[str], requested: str | None, source: str
) -> Architecture:
    """The architecture to build: `requested`, else config.json's `architectures[0]`, else
    inferred from `model_type` and the head tensors present."""
    if requested is not None:
        if requested not in ARCHITECTURES:
            raise unsupported(repr(requested), "architecture=")
        arch = ARCHITECTURES[requested]
    else:
        listed = hf.get("architectures") or []
        if listed:
            if listed[0] not in ARCHITECTURES:
                raise unsupported(f"{listed} (model_type {hf.get('model_type')!r})", source)
            arch = ARCHITECTURES[listed[0]]
        else:
            names = set(names)
            model_type = hf.get("model_type")
            if model_type == "bert":
                if any(n.startswith("cls.predictions.") for n in names):
                    arch = ARCHITECTURES["BertForMaskedLM"]
                elif any(n.startswith("qa_outputs.") for n in names):
                    arch = ARCHITECTURES["BertForQuestionAnswering"]
                elif any(n.startswith("classifier.") for n in names):
                    # A sequence classifier reads the pooler; a token classifier has none.
                    pooled = any(n.startswith("bert.pooler.") for n in names)
                    arch = ARCHITECTURES[
                        "BertForSequenceClassification" if pooled else "BertForTokenClassification"
                    ]
                else:
                    arch = ARCHITECTURES["BertModel"]
            elif model_type == "gpt2":
                arch = ARCHITECTURES["GPT2LMHeadModel"]
            elif model_type in FAMILIES:
                family = FAMILIES[model_type]
                if family.infer is not None:
                    name = family.infer(names)
                    if name not in ARCHITECTURES:
                        raise unsupported(f"{name} (inferred from the tensor names)", source)
                    arch = ARCHITECTURES[name]
                else:
                    # A family's first registered architecture with a head is its default.
                    arch = next(
                        a
                        for a in ARCHITECTURES.values()
                        if a.family == model_type and a.head != "none"
                    )
            else:
                raise unsupported(f"of model_type {model_type!r} (no 'architectures' key)", source)
    if hf.get("model_type", arch.family) != arch.family:
        raise CheckpointError(
            f"{source}: architecture {arch.name} needs model_type {arch.family!r}, "
            f"but config.json has model_type {hf.get('model_type')!r}"
        )
    return arch


# ---------------------------------------------------------------------------------------------
# Configs

# lmflax field -> HF key, per family (for loading and for naming mismatches).
BERT_KEYS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "d_ff": "intermediate_size",
    "max_len": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "norm_eps": "layer_norm_eps",
    "activation": "hidden_act",
}
GPT2_KEYS = {
    "vocab_size": "vocab_size",
    "d_model": "n_embd",
    "num_layers": "n_layer",
    "num_heads": "n_head",
    "d_ff": "n_inner",
    "max_len": "n_positions",
    "norm_eps": "layer_norm_epsilon",
    "activation": "activation_function",
    "tie_embeddings": "tie_word_embeddings",
}
# What neither HF BERT nor GPT-2 has (rotary scaling, split attention biases, windows).
_PLAIN_ATTENTION = {
    "rope_scaling": "none",
    "sliding_window": None,
    "resolved_qkv_bias": True,
    "resolved_out_bias": True,
}
# What the HF implementations hard-wire, as lmflax fields.
FIXED = {
    "bert": {
        "norm": "layernorm",
        "norm_position": "post",
        "position": "learned",
        "use_bias": True,
        "rope_base": None,
        **_PLAIN_ATTENTION,
    },
    "gpt2": {
        "norm": "layernorm",
        "norm_position": "pre",
        "position": "learned",
        "use_bias": True,
        "rope_base": None,
        **_PLAIN_ATTENTION,
    },
}
# Fields that change shapes or numerics; a model initialised from a checkpoint must agree on
# all of them (dropout, dtypes, scan/remat, init are free).
ARCH_FIELDS = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "resolved_kv_heads",
    "resolved_head_dim",
    "d_ff",
    "max_len",
    "type_vocab_size",
    "pad_token_id",
    "norm_eps",
    "activation",
    "tie_embeddings",
    "norm",
    "norm_position",
    "position",
    "use_bias",
    "rope_base",
    "rope_fraction",
    "rope_scaling",
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
    "resolved_qkv_bias",
    "resolved_out_bias",
    "sliding_window",
    # Encoder-decoders (lmflax.models.seq2seq); skipped for configs that lack them.
    "decoder_layers",
    "relative_buckets",
    "relative_max_distance",
    "scale_embeddings",
    "scale_logits",
    "sinusoidal_layout",
    "embed_norm",
    "logits_bias",
)
# Fields from_pretrained lets a caller override (they do not change the checkpoint's meaning).
RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "scan_layers",
    "remat",
    "attention_impl",
    "dropout_rate",
    "attention_dropout_rate",
    "init_std",
)


def _need(hf: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise CheckpointError(f"{source}: config.json has no {key!r}")
    return hf[key]


def _activation(hf: Mapping[str, Any], key: str, default: str, source: str) -> str:
    name = hf.get(key, default)
    if name not in ACT_FROM_HF:
        raise CheckpointError(
            f"{source}: {key}={name!r} is not supported; supported: {', '.join(ACT_FROM_HF)}"
        )
    return ACT_FROM_HF[name]


def lmflax_config(
    arch: Architecture, hf: Mapping[str, Any], names: Iterable[str], source: str
) -> ModelConfig:
    """The lmflax model config equivalent to a HF config.json (CheckpointError if some setting
    has no lmflax equivalent). `names` are the checkpoint's tensor names (BERT's pooler is kept
    only where the checkpoint has one)."""
    if arch.family in FAMILIES:
        return FAMILIES[arch.family].config(arch, hf, names, source)
    if arch.family == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"{source}: position_embedding_type={hf['position_embedding_type']!r} is not "
                "supported (lmflax BERT has absolute learned positions: 'absolute')"
            )
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise CheckpointError(
                f"{source}: BERT as a decoder (is_decoder / add_cross_attention) is not supported"
            )
        has_pooler = any(n.endswith("pooler.dense.weight") for n in names)
        return BertConfig(
            vocab_size=_need(hf, "vocab_size", source),
            d_model=_need(hf, "hidden_size", source),
            num_layers=_need(hf, "num_hidden_layers", source),
            num_heads=_need(hf, "num_attention_heads", source),
            d_ff=_need(hf, "intermediate_size", source),
            max_len=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            activation=_activation(hf, "hidden_act", "gelu", source),
            dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
            attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.1)),
            init_std=float(hf.get("initializer_range", 0.02)),
            add_pooler=has_pooler and arch.head in ("none", "classifier"),
        )
    for key, bad in (
        ("scale_attn_weights", False),
        ("scale_attn_by_inverse_layer_idx", True),
        ("add_cross_attention", True),
    ):
        if hf.get(key, not bad) == bad:
            raise CheckpointError(f"{source}: GPT-2 with {key}={bad} is not supported")
    d_model = _need(hf, "n_embd", source)
    return GPTConfig(
        vocab_size=_need(hf, "vocab_size", source),
        d_model=d_model,
        num_layers=_need(hf, "n_layer", source),
        num_heads=_need(hf, "n_head", source),
        d_ff=hf.get("n_inner") or 4 * d_model,
        max_len=hf.get("n_positions", 1024),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=_activation(hf, "activation_function", "gelu_new", source),
        dropout_rate=float(hf.get("resid_pdrop", 0.1)),
        attention_dropout_rate=float(hf.get("attn_pdrop", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def describe_hf_value(family: str, field: str, hf: Mapping[str, Any], derived: Any) -> str:
    """How a HF config expresses lmflax `field` (for mismatch messages)."""
    if family in FAMILIES:
        return FAMILIES[family].describe(field, hf, derived)
    return describe_by_keys(
        family, BERT_KEYS if family == "bert" else GPT2_KEYS, field, hf, derived
    )


def describe_key(
    keys: Mapping[str, str], field: str, hf: Mapping[str, Any], derived: Any, architecture: Any
) -> str:
    """How config.json expresses lmflax `field` through its HF key in `keys` (lmflax field ->
    HF key), for mismatch messages; a field with no key is fixed by `architecture`."""
    if field in keys:
        key = keys[field]
        if key in hf:
            return f"{key}={hf[key]!r}" + ("" if hf[key] == derived else f" (= {derived!r})")
        return f"{key} unset (= {derived!r})"
    return f"{derived!r} (fixed by the {architecture} architecture)"


def describe_by_keys(
    family: str, keys: Mapping[str, str], field: str, hf: Mapping[str, Any], derived: Any
) -> str:
    """describe_hf_value for a family whose lmflax fields map to HF keys one to one (`keys`:
    lmflax field -> HF key); a family's `describe` can be this with its keys bound."""
    width, heads = keys["d_model"], keys["num_heads"]
    if field == "resolved_kv_heads":
        return f"{derived} key/value heads ({heads}={hf.get(heads)!r}; {family} has no GQA/MQA)"
    if field == "resolved_head_dim":
        return f"head_dim {width} / {heads} = {derived}"
    if field in keys and keys[field] in hf:
        shown = f"{keys[field]}={hf[keys[field]]!r}"
        return shown if hf[keys[field]] == derived else f"{shown} (= {derived!r})"
    if field in keys:
        return f"{keys[field]} unset (default {derived!r})"
    return f"{derived!r} (fixed by the {family} architecture)"


def hf_config(
    arch: Architecture, cfg: ModelConfig, *, num_labels: int | None = None
) -> dict[str, Any]:
    """The config.json for exporting `cfg` as `arch`; CheckpointError names any lmflax setting
    the HF implementation cannot express."""
    if arch.family in FAMILIES:
        return FAMILIES[arch.family].hf_config(arch, cfg, num_labels)
    if arch.family == "bert" and cfg.type_vocab_size == 0:
        raise CheckpointError(
            f"cannot export as {arch.name}: model.type_vocab_size=0 (HF BERT needs token-type "
            "embeddings; a BERT without them exports as DistilBertModel)"
        )
    check_exportable(arch, cfg, FIXED[arch.family])
    return _hf_config(arch, cfg, num_labels)


def check_exportable(arch: Architecture, cfg: ModelConfig, fixed: Mapping[str, Any]) -> None:
    """CheckpointError naming every setting of `cfg` that HF's `arch` cannot express: the
    `fixed` fields' values, GQA, a head_dim other than d_model / num_heads, the activation."""
    errs = []
    for field, want in fixed.items():
        if getattr(cfg, field) != want:
            errs.append(f"model.{field}={getattr(cfg, field)!r} (HF {arch.name} needs {want!r})")
    if cfg.resolved_kv_heads != cfg.num_heads:
        errs.append(f"model.num_kv_heads={cfg.num_kv_heads} (HF {arch.name} has no GQA/MQA)")
    if cfg.resolved_head_dim * cfg.num_heads != cfg.d_model:
        errs.append(
            f"model.head_dim={cfg.head_dim} (HF {arch.name} needs num_heads × head_dim = d_model)"
        )
    if cfg.activation not in ACT_TO_HF:
        errs.append(
            f"model.activation={cfg.activation!r} (HF accepts {', '.join(sorted(ACT_TO_HF))})"
        )
    if errs:
        raise CheckpointError(f"cannot export as {arch.name}: " + "; ".join(errs))


def label_maps(num_labels: int) -> dict[str, Any]:
    """config.json's id2label / label2id for `num_labels` classes."""
    return {
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(num_labels)},
    }


def _hf_config(arch: Architecture, cfg: ModelConfig, num_labels: int | None) -> dict[str, Any]:
    if arch.family == "bert":
        out: dict[str, Any] = {
            "model_type": "bert",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.d_ff,
            "hidden_act": ACT_TO_HF[cfg.activation],
            "hidden_dropout_prob": cfg.dropout_rate,
            "attention_probs_dropout_prob": cfg.attention_dropout_rate,
            "max_position_embeddings": cfg.max_len,
            "type_vocab_size": cfg.type_vocab_size,
            "initializer_range": cfg.init_std,
            "layer_norm_eps": cfg.norm_eps,
            "position_embedding_type": "absolute",
            "pad_token_id": 0,
            "tie_word_embeddings": True,
        }
    else:
        out = {
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.max_len,
            "activation_function": ACT_TO_HF[cfg.activation],
            "resid_pdrop": cfg.dropout_rate,
            "embd_pdrop": cfg.dropout_rate,
            "attn_pdrop": cfg.attention_dropout_rate,
            "layer_norm_epsilon": cfg.norm_eps,
            "initializer_range": cfg.init_std,
            "tie_word_embeddings": cfg.tie_embeddings,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "bos_token_id": None,
            "eos_token_id": None,
        }
    out["architectures"] = [arch.name]
    out["dtype"] = cfg.param_dtype
    if num_labels is not None:
        out.update(label_maps(num_labels))
    return out


def build_module(arch: Architecture, cfg: ModelConfig, num_labels: int | None = None) -> nn.Module:
    """The lmflax module for `arch`."""
    if arch.family in FAMILIES:
        return FAMILIES[arch.family].build(arch, cfg, num_labels)
    if arch.family == "gpt2":
        return GPT(cfg)
    if arch.head == "none":
        return BertModel(cfg)
    if arch.head == "mlm":
        return BertForMaskedLM(cfg)
    if arch.head == "qa":
        return BertForQuestionAnswering(cfg)
    if num_labels is None:
        raise CheckpointError(f"{arch.name} needs num_labels")
    if arch.head == "tagger":
        return BertForTokenClassification(cfg, num_labels)
    return BertForSequenceClassification(cfg, num_labels)


def num_labels_of(hf: Mapping[str, Any]) -> int:
    """HF's label count: len(id2label), else num_labels, else 2 (its default)."""
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


# ---------------------------------------------------------------------------------------------
# Parameter layouts


@dataclasses.dataclass(frozen=True)
class Rule:
    """Checkpoint tensors `hf` (shapes `hf_shapes`) <-> lmflax parameters `paths` (`shapes`)."""

    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    paths: tuple[Path_, ...]
    shapes: tuple[tuple[int, ...], ...]
    to_lmflax: Callable[..., tuple[np.ndarray, ...]]
    to_hf: Callable[..., tuple[np.ndarray, ...]]


def _same(name: str, path: Path_, shape: tuple[int, ...]) -> Rule:
    return Rule((name,), (shape,), (path,), (shape,), lambda x: (x,), lambda x: (x,))


def _norm(name: str, path: Path_, D: int) -> list[Rule]:
    return [
        _same(f"{name}.weight", (*path, "scale"), (D,)),
        _same(f"{name}.bias", (*path, "bias"), (D,)),
    ]


def _dense(
    name: str,
    path: Path_,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    *,
    transposed: bool,
    bias: bool = True,
) -> list[Rule]:
    """A dense layer. transposed=True: torch nn.Linear, weight [out, in]; False: Conv1D [in, out].
    lmflax kernel [*in_shape, *out_shape], bias [*out_shape]."""
    i, o = math.prod(in_shape), math.prod(out_shape)
    kshape = (*in_shape, *out_shape)
    if transposed:
        w = Rule(
            (f"{name}.weight",),
            ((o, i),),
            ((*path, "kernel"),),
            (kshape,),
            lambda w: (w.T.reshape(kshape),),
            lambda k: (k.reshape(i, o).T,),
        )
    else:
        w = Rule(
            (f"{name}.weight",),
            ((i, o),),
            ((*path, "kernel"),),
            (kshape,),
            lambda w: (w.reshape(kshape),),
            lambda k: (k.reshape(i, o),),
        )
    rules = [w]
    if bias:
        rules.append(
            Rule(
                (f"{name}.bias",),
                ((o,),),
                ((*path, "bias"),),
                (out_shape,),
                lambda b: (b.reshape(out_shape),),
                lambda b: (b.reshape(o),),
            )
        )
    return rules


def _fused_qkv(name: str, path: Path_, D: int, N: int, H: int) -> list[Rule]:
    """GPT-2's c_attn: Conv1D [D, 3·N·H], columns q | k | v, each head-major (n·H + h)."""
    paths = tuple((*path, p) for p in ("query", "key", "value"))
    return [
        Rule(
            (f"{name}.weight",),
            ((D, 3 * N * H),),
            tuple((*p, "kernel") for p in paths),
            ((D, N, H),) * 3,
            lambda w: tuple(np.moveaxis(w.reshape(D, 3, N, H), 1, 0)),
            lambda q, k, v: (np.stack([q, k, v], axis=1).reshape(D, 3 * N * H),),
        ),
        Rule(
            (f"{name}.bias",),
            ((3 * N * H,),),
            tuple((*p, "bias") for p in paths),
            ((N, H),) * 3,
            lambda b: tuple(b.reshape(3, N, H)),
            lambda q, k, v: (np.stack([q, k, v]).reshape(3 * N * H),),
        ),
    ]


@dataclasses.dataclass
class Layout:
    """Everything needed to move an architecture's weights either way."""

    rules: list[Rule]
    # Tensors a checkpoint may hold as copies of another tensor (tied weights): name -> source.
    tied: dict[str, str]
    # Tensors that are not parameters (buffers) or belong to heads this module does not have.
    ignored: re.Pattern
    heads: re.Pattern


def bert_backbone_rules(cfg: BertConfig, p: str, root: Path_) -> list[Rule]:
    """BERT's embeddings and encoder layers (HF names under prefix `p`, lmflax paths under
    `root`); RoBERTa and XLM-RoBERTa name theirs the same way."""
    D, N, H, F = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.d_ff
    rules = [
        _same(
            f"{p}embeddings.word_embeddings.weight",
            (*root, "token_embed", "embedding"),
            (cfg.vocab_size, D),
        ),
        _same(
            f"{p}embeddings.position_embeddings.weight",
            (*root, "position_embed", "embedding"),
            (cfg.max_len, D),
        ),
        _same(
            f"{p}embeddings.token_type_embeddings.weight",
            (*root, "type_embed", "embedding"),
            (cfg.type_vocab_size, D),
        ),
        *_norm(f"{p}embeddings.LayerNorm", (*root, "embed_norm"), D),
    ]
    for i in range(cfg.num_layers):
        h = f"{p}encoder.layer.{i}."
        layer = (*root, "encoder", f"layers_{i}")
        for name in ("query", "key", "value"):
            rules += _dense(
                h + f"attention.self.{name}",
                (*layer, "attention", name),
                (D,),
                (N, H),
                transposed=True,
            )
        rules += _dense(
            h + "attention.output.dense",
            (*layer, "attention", "out"),
            (N, H),
            (D,),
            transposed=True,
        )
        rules += _norm(h + "attention.output.LayerNorm", (*layer, "attention_norm"), D)
        rules += _dense(
            h + "intermediate.dense", (*layer, "mlp", "wi"), (D,), (F,), transposed=True
        )
        rules += _dense(h + "output.dense", (*layer, "mlp", "wo"), (F,), (D,), transposed=True)
        rules += _norm(h + "output.LayerNorm", (*layer, "mlp_norm"), D)
    return rules


def span_rules(name: str, D: int) -> list[Rule]:
    """A QA head: HF nn.Linear(D, 2) `name` <-> lmflax SpanHead `qa_outputs`."""
    return _dense(name, ("qa_outputs",), (D,), (2,), transposed=True)


def _bert_layout(
    arch: Architecture, cfg: BertConfig, prefix: str, num_labels: int | None
) -> Layout:
    D = cfg.d_model
    p = prefix
    root: Path_ = ("bert",) if arch.head != "none" else ()
    rules = bert_backbone_rules(cfg, p, root)
    if arch.head == "classifier" or (arch.head == "none" and cfg.add_pooler):
        rules += _dense(f"{p}pooler.dense", (*root, "pooler"), (D,), (D,), transposed=True)
    tied = {}
    if arch.head == "mlm":
        rules += _dense(
            "cls.predictions.transform.dense", ("transform",), (D,), (D,), transposed=True
        )
        rules += _norm("cls.predictions.transform.LayerNorm", ("transform_norm",), D)
        rules.append(_same("cls.predictions.bias", ("decoder_bias",), (cfg.vocab_size,)))
        tied = {
            "cls.predictions.decoder.weight": f"{p}embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias",
        }
    if arch.head in ("classifier", "tagger"):
        rules += _dense("classifier", ("classifier",), (D,), (num_labels,), transposed=True)
    if arch.head == "qa":
        rules += span_rules("qa_outputs", D)
    return Layout(
        rules,
        tied,
        ignored=re.compile(r"^(bert\.)?embeddings\.(position_ids|token_type_ids)$"),
        heads=re.compile(r"^(cls\.|classifier\.|qa_outputs\.|(bert\.)?pooler\.)"),
    )


def _gpt2_layout(cfg: GPTConfig, prefix: str) -> Layout:
    D, N, H, F = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.d_ff
    p = prefix
    rules = [
        _same(f"{p}wte.weight", ("token_embed", "embedding"), (cfg.vocab_size, D)),
        _same(f"{p}wpe.weight", ("position_embed", "embedding"), (cfg.max_len, D)),
    ]
    for i in range(cfg.num_layers):
        h = f"{p}h.{i}."
        layer = ("decoder", f"layers_{i}")
        rules += _norm(h + "ln_1", (*layer, "attention_norm"), D)
        rules += _fused_qkv(h + "attn.c_attn", (*layer, "attention"), D, N, H)
        rules += _dense(
            h + "attn.c_proj", (*layer, "attention", "out"), (N, H), (D,), transposed=False
        )
        rules += _norm(h + "ln_2", (*layer, "mlp_norm"), D)
        rules += _dense(h + "mlp.c_fc", (*layer, "mlp", "wi"), (D,), (F,), transposed=False)
        rules += _dense(h + "mlp.c_proj", (*layer, "mlp", "wo"), (F,), (D,), transposed=False)
    rules += _norm(f"{p}ln_f", ("decoder", "final_norm"), D)
    tied = {}
    if cfg.tie_embeddings:
        tied["lm_head.weight"] = f"{p}wte.weight"
    else:
        rules += _dense(
            "lm_head", ("lm_head",), (D,), (cfg.vocab_size,), transposed=True, bias=False
        )
    return Layout(
        rules,
        tied,
        # The causal-mask buffers older GPT-2 checkpoints carry.
        ignored=re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$"),
        heads=re.compile(r"^(lm_head\.|score\.|multiple_choice_head\.)"),
    )


def layout(
    arch: Architecture, cfg: ModelConfig, prefix: str, num_labels: int | None = None
) -> Layout:
    """The rules of `arch` with backbone tensor names starting with `prefix` ('' or e.g. 'bert.')."""
    if arch.family in FAMILIES:
        return FAMILIES[arch.family].layout(arch, cfg, prefix, num_labels)
    if arch.family == "bert":
        return _bert_layout(arch, cfg, prefix, num_labels)
    return _gpt2_layout(cfg, prefix)


def checkpoint_prefix(arch: Architecture, names: Iterable[str]) -> str:
    """Whether the checkpoint's backbone tensors carry the base-model prefix ('bert.',
    'transformer.'): a head model's checkpoint does, a base model's does not."""
    if arch.family in FAMILIES:
        anchor = FAMILIES[arch.family].anchor
    else:
        anchor = "embeddings." if arch.family == "bert" else "wte."
    return arch.base_prefix if any(n.startswith(arch.base_prefix + anchor) for n in names) else ""


def normalize_name(name: str) -> str:
    """Old BERT checkpoints name LayerNorm parameters gamma/beta (TF heritage)."""
    if ".LayerNorm." in name or name.startswith("LayerNorm."):
        name = re.sub(r"\.gamma$", ".weight", name)
        name = re.sub(r"\.beta$", ".bias", name)
    return name


def fmt_path(path: Path_) -> str:
    return "/".join(path)


def tensors_to_params(
    lay: Layout,
    shape_of: Callable[[str], tuple[int, ...]],
    read: Callable[[str], np.ndarray],
    names: Iterable[str],
    *,
    where: Callable[[str], str],
    strict: bool,
) -> tuple[dict[Path_, np.ndarray], list[str]]:
    """Reads the checkpoint through the rules: {lmflax path: array} and the checkpoint tensors
    left unused (heads this module lacks). With `read` giving lazy tensors (WeightSource.lazy)
    the values are lazy views, read block by block later. Every missing tensor, wrong shape, or (if strict)
    unknown tensor is reported at once in a CheckpointError."""
    original = {normalize_name(n): n for n in names}
    errs: list[str] = []
    used: set[str] = set()
    out: dict[Path_, np.ndarray] = {}
    for rule in lay.rules:
        ok = True
        for name, want in zip(rule.hf, rule.hf_shapes):
            if name not in original:
                errs.append(
                    f"tensor {name!r} (for lmflax parameter "
                    f"{', '.join(fmt_path(p) for p in rule.paths)}) is missing"
                )
                ok = False
                continue
            got = tuple(shape_of(original[name]))
            if got != want:
                errs.append(
                    f"{where(original[name])}: tensor {name!r} has shape {got}, but the config "
                    f"implies {want} (lmflax parameter "
                    + ", ".join(f"{fmt_path(p)} {s}" for p, s in zip(rule.paths, rule.shapes))
                    + ")"
                )
                ok = False
        used.update(rule.hf)
        if not ok:
            continue
        arrays = rule.to_lmflax(*(read(original[n]) for n in rule.hf))
        for path, arr, shape in zip(rule.paths, arrays, rule.shapes):
            # A lazy tensor (lmflax.hf.lazy) stays lazy: reshaped as a view, read later.
            out[path] = (arr if isinstance(arr, lazy.Lazy) else np.asarray(arr)).reshape(shape)
    for name, target in lay.tied.items():
        if name in original and target in original and not errs:
            a, b = read(original[name]), read(original[target])
            if not lazy.array_equal(a, b):
                errs.append(
                    f"{where(original[name])}: {name!r} is not a copy of {target!r}; lmflax ties "
                    "these weights (an untied output layer is not supported for this model)"
                )
        used.add(name)
    unused, unknown = [], []
    for name in original:
        if name in used or lay.ignored.match(name):
            continue
        (unused if lay.heads.match(name) else unknown).append(name)
    if unknown and strict:
        errs.append(
            f"{len(unknown)} tensors match no parameter of this architecture: "
            + ", ".join(repr(n) for n in unknown[:8])
            + (" ..." if len(unknown) > 8 else "")
        )
    if errs:
        raise CheckpointError(
            "; ".join(errs[:12]) + (f"; ... ({len(errs)} problems)" if len(errs) > 12 else "")
        )
    return out, unused + unknown


def export_rules(lay: Layout, flat: Mapping[Path_, Any], what: str) -> list[Rule]:
    """The rules that turn lmflax parameters `flat` ({path: anything with a `.shape`}) into
    checkpoint tensors, after checking every parameter is there with the shape the config
    implies and that each is consumed (one the architecture cannot hold is an error)."""
    errs = []
    used = set()
    rules = []
    for rule in lay.rules:
        missing = [fmt_path(p) for p in rule.paths if p not in flat]
        if missing:
            errs.append(f"parameter {', '.join(missing)} is missing")
            continue
        bad = [
            f"{fmt_path(p)} has shape {tuple(flat[p].shape)} but the config implies {s}"
            for p, s in zip(rule.paths, rule.shapes)
            if tuple(flat[p].shape) != s
        ]
        if bad:
            errs.extend(bad)
            continue
        used.update(rule.paths)
        rules.append(rule)
    extra = [fmt_path(p) for p in flat if p not in used]
    if extra:
        errs.append(f"parameters with no place in the checkpoint: {', '.join(extra)}")
    if errs:
        raise CheckpointError(f"{what}: " + "; ".join(errs))
    return rules


def rule_to_hf(rule: Rule, arrays: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """One rule's checkpoint tensors from its lmflax parameters (host arrays, in rule.paths
    order), C-contiguous in the checkpoint's shapes."""
    return {
        name: np.ascontiguousarray(np.asarray(arr).reshape(shape))
        for name, arr, shape in zip(rule.hf, rule.to_hf(*arrays), rule.hf_shapes)
    }


def params_to_tensors(
    lay: Layout, flat: Mapping[Path_, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    """lmflax parameters {path: array} -> checkpoint tensors, through the rules. Every lmflax
    parameter must be consumed: one the architecture cannot hold is an error."""
    out: dict[str, np.ndarray] = {}
    for rule in export_rules(lay, flat, what):
        out.update(rule_to_hf(rule, [flat[p] for p in rule.paths]))
    return out


def flatten(tree: Mapping[str, Any], prefix: Path_ = ()) -> dict[Path_, Any]:
    out: dict[Path_, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def unflatten(flat: Mapping[Path_, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out
