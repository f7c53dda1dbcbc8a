"""RoBERTa and XLM-RoBERTa (HF model_type 'roberta' / 'xlm-roberta') <-> lmflax RobertaConfig.

Both are BERT's tensors under the prefix 'roberta.' (the same names below it), with positions
counted from pad_token_id + 1 over the non-padding tokens, a single token type, and their own
heads: `lm_head` (MLM: dense, gelu, layer_norm, the tied decoder plus `lm_head.bias`), the
sequence `classifier` (dense + tanh + out_proj on <s>, no pooler), the token `classifier`
and `qa_outputs`. XLM-RoBERTa's modules are RoBERTa's; only the model_type and class names
differ, so one lmflax config serves both (export as XLM-RoBERTa by naming the architecture).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn

from lmflax.hf import convert
from lmflax.hf.convert import Architecture, Layout, Path_
from lmflax.hf.files import CheckpointError
from lmflax.models import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForTokenClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)
from lmflax.models.config import ModelConfig

KEYS = {**convert.BERT_KEYS, "pad_token_id": "pad_token_id"}

# Architecture name suffix -> (head, the parameter that holds the label count).
HEADS: dict[str, tuple[str, Path_ | None]] = {
    "Model": ("none", None),
    "ForMaskedLM": ("mlm", None),
    "ForSequenceClassification": ("classifier", ("classifier", "out_proj", "kernel")),
    "ForTokenClassification": ("tagger", ("classifier", "kernel")),
    "ForQuestionAnswering": ("qa", None),
}
NAMES = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta"}


def _architectures(model_type: str) -> list[Architecture]:
    return [
        Architecture(NAMES[model_type] + suffix, model_type, head, "roberta.", labels)
        for suffix, (head, labels) in HEADS.items()
    ]


def to_lmflax(
    arch: Architecture, hf: Mapping[str, Any], names: Iterable[str], source: str
) -> ModelConfig:
    """config.json -> RobertaConfig (CheckpointError for what lmflax cannot express)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"{source}: position_embedding_type={hf['position_embedding_type']!r} is not "
            "supported (lmflax RoBERTa has absolute learned positions: 'absolute')"
        )
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise CheckpointError(
            f"{source}: {arch.name} as a decoder (is_decoder / add_cross_attention) is not "
            "supported"
        )
    pad = hf.get("pad_token_id", 1)
    if not isinstance(pad, int):
        raise CheckpointError(
            f"{source}: pad_token_id={pad!r}; RoBERTa's positions need an integer pad_token_id"
        )
    activation = convert._activation(hf, "hidden_act", "gelu", source)
    if arch.head == "mlm" and activation != "gelu":
        raise CheckpointError(
            f"{source}: {arch.name} with hidden_act={hf.get('hidden_act')!r}: HF's RoBERTa MLM "
            "head applies exact gelu whatever hidden_act is, lmflax's the encoder's activation; "
            "supported: hidden_act='gelu'"
        )
    has_pooler = any(n.endswith("pooler.dense.weight") for n in names)
    need = convert._need
    return RobertaConfig(
        vocab_size=need(hf, "vocab_size", source),
        d_model=need(hf, "hidden_size", source),
        num_layers=need(hf, "num_hidden_layers", source),
        num_heads=need(hf, "num_attention_heads", source),
        d_ff=need(hf, "intermediate_size", source),
        max_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        pad_token_id=pad,
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        activation=activation,
        dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)),
        add_pooler=has_pooler and arch.head == "none",
    )


def to_hf(arch: Architecture, cfg: ModelConfig, num_labels: int | None) -> dict[str, Any]:
    """RobertaConfig -> config.json of `arch`."""
    if not isinstance(cfg, RobertaConfig):
        raise CheckpointError(
            f"cannot export as {arch.name}: the model config is {type(cfg).__name__}, not "
            "RobertaConfig (family 'roberta')"
        )
    convert.check_exportable(arch, cfg, convert.FIXED["bert"])
    if arch.head == "mlm" and cfg.activation != "gelu":
        raise CheckpointError(
            f"cannot export as {arch.name}: model.activation={cfg.activation!r} (HF's RoBERTa "
            "MLM head applies 'gelu')"
        )
    out: dict[str, Any] = {
        "model_type": arch.family,
        "architectures": [arch.name],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": convert.ACT_TO_HF[cfg.activation],
        "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.attention_dropout_rate,
        "max_position_embeddings": cfg.max_len,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": True,
        "dtype": cfg.param_dtype,
    }
    if num_labels is not None:
        out.update(convert.label_maps(num_labels))
    return out


def layout(arch: Architecture, cfg: RobertaConfig, prefix: str, num_labels: int | None) -> Layout:
    D = cfg.d_model
    root: Path_ = ("bert",) if arch.head != "none" else ()
    rules = convert.bert_backbone_rules(cfg, prefix, root)
    if arch.head == "none" and cfg.add_pooler:
        rules += convert._dense(f"{prefix}pooler.dense", ("pooler",), (D,), (D,), transposed=True)
    tied = {}
    if arch.head == "mlm":
        rules += convert._dense("lm_head.dense", ("transform",), (D,), (D,), transposed=True)
        rules += convert._norm("lm_head.layer_norm", ("transform_norm",), D)
        rules.append(convert._same("lm_head.bias", ("decoder_bias",), (cfg.vocab_size,)))
        tied = {
            "lm_head.decoder.weight": f"{prefix}embeddings.word_embeddings.weight",
            "lm_head.decoder.bias": "lm_head.bias",
        }
    if arch.head == "classifier":
        rules += convert._dense(
            "classifier.dense", ("classifier", "dense"), (D,), (D,), transposed=True
        )
        rules += convert._dense(
            "classifier.out_proj",
            ("classifier", "out_proj"),
            (D,),
            (num_labels,),
            transposed=True,
        )
    if arch.head == "tagger":
        rules += convert._dense("classifier", ("classifier",), (D,), (num_labels,), transposed=True)
    if arch.head == "qa":
        rules += convert.span_rules("qa_outputs", D)
    return Layout(
        rules,
        tied,
        ignored=re.compile(r"^(roberta\.)?embeddings\.(position_ids|token_type_ids)$"),
        heads=re.compile(r"^(lm_head\.|classifier\.|qa_outputs\.|(roberta\.)?pooler\.)"),
    )


def build(arch: Architecture, cfg: RobertaConfig, num_labels: int | None) -> nn.Module:
    if arch.head == "none":
        return RobertaModel(cfg)
    if arch.head == "mlm":
        return BertForMaskedLM(cfg)
    if arch.head == "qa":
        return BertForQuestionAnswering(cfg)
    if num_labels is None:
        raise CheckpointError(f"{arch.name} needs num_labels")
    if arch.head == "tagger":
        return BertForTokenClassification(cfg, num_labels)
    return RobertaForSequenceClassification(cfg, num_labels)


def _infer(name: str) -> Any:
    def infer(names: set[str]) -> str:
        if any(n.startswith("lm_head.") for n in names):
            return name + "ForMaskedLM"
        if any(n.startswith("qa_outputs.") for n in names):
            return name + "ForQuestionAnswering"
        if any(n.startswith("classifier.out_proj.") for n in names):
            return name + "ForSequenceClassification"
        if any(n.startswith("classifier.") for n in names):
            return name + "ForTokenClassification"
        return name + "Model"

    return infer


def export_as(cfg: ModelConfig, flat: Mapping[Path_, Any]) -> str | None:
    """A RobertaConfig model's architecture, from its head's parameters (RoBERTa's names;
    pass architecture='XLMRoberta...' to save_pretrained for XLM-RoBERTa)."""
    if cfg.family != "roberta":
        return None
    roots = {p[0] for p in flat}
    if "qa_outputs" in roots:
        return "RobertaForQuestionAnswering"
    if ("classifier", "out_proj", "kernel") in flat:
        return "RobertaForSequenceClassification"
    if "classifier" in roots:
        return "RobertaForTokenClassification"
    if "transform" in roots or "decoder_bias" in roots:
        return "RobertaForMaskedLM"
    return "RobertaModel"


for _type, _name in NAMES.items():
    convert.register_family(
        convert.Family(
            model_type=_type,
            lmflax_family="roberta",
            anchor="embeddings.",
            describe=functools.partial(convert.describe_by_keys, _type, KEYS),
            config=to_lmflax,
            hf_config=to_hf,
            layout=layout,
            build=build,
            infer=_infer(_name),
            # Exports default to RoBERTa's class names; XLM-RoBERTa is chosen by name.
            export_as=export_as if _type == "roberta" else lambda cfg, flat: None,
        ),
        _architectures(_type),
    )
