"""DistilBERT (HF model_type 'distilbert') <-> lmflax BertConfig with type_vocab_size=0.

DistilBERT is BERT's post-norm encoder without token types and without a pooler, under other
names: `embeddings.{word,position}_embeddings`, `transformer.layer.N.attention.{q,k,v,out}_lin`,
`sa_layer_norm`, `ffn.lin1/lin2`, `output_layer_norm`; LayerNorm eps is fixed at 1e-12. Its MLM
head (vocab_transform, activation, vocab_layer_norm, the tied vocab_projector plus its bias) is
BERT's; its token-classification and QA heads (`classifier`, `qa_outputs`) too.
DistilBertForSequenceClassification (pre_classifier + ReLU) has no lmflax module and is refused.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn

from lmflax.hf import convert
from lmflax.hf.convert import ACT_TO_HF, Architecture, Layout, Path_
from lmflax.hf.files import CheckpointError
from lmflax.models import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
)
from lmflax.models.config import ModelConfig

KEYS = {
    "vocab_size": "vocab_size",
    "d_model": "dim",
    "num_layers": "n_layers",
    "num_heads": "n_heads",
    "d_ff": "hidden_dim",
    "max_len": "max_position_embeddings",
    "activation": "activation",
}
EPS = 1e-12  # HF's DistilBERT hard-wires LayerNorm eps
ARCHS = [
    Architecture("DistilBertModel", "distilbert", "none", "distilbert."),
    Architecture("DistilBertForMaskedLM", "distilbert", "mlm", "distilbert."),
    Architecture(
        "DistilBertForTokenClassification",
        "distilbert",
        "tagger",
        "distilbert.",
        ("classifier", "kernel"),
    ),
    Architecture("DistilBertForQuestionAnswering", "distilbert", "qa", "distilbert."),
]


def to_lmflax(
    arch: Architecture, hf: Mapping[str, Any], names: Iterable[str], source: str
) -> ModelConfig:
    """config.json -> BertConfig(type_vocab_size=0, add_pooler=False)."""
    del names
    if hf.get("sinusoidal_pos_embds"):
        raise CheckpointError(
            f"{source}: sinusoidal_pos_embds=True is not supported (HF keeps that table frozen; "
            "lmflax would train it as learned positions); supported: sinusoidal_pos_embds=False"
        )
    if arch.head == "qa" and convert.num_labels_of(hf) != 2:
        raise CheckpointError(
            f"{source}: {arch.name} with {convert.num_labels_of(hf)} labels; QA has 2 (start, end)"
        )
    need = convert._need
    return BertConfig(
        vocab_size=need(hf, "vocab_size", source),
        d_model=need(hf, "dim", source),
        num_layers=need(hf, "n_layers", source),
        num_heads=need(hf, "n_heads", source),
        d_ff=need(hf, "hidden_dim", source),
        max_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=0,
        norm_eps=EPS,
        activation=convert._activation(hf, "activation", "gelu", source),
        dropout_rate=float(hf.get("dropout", 0.1)),
        attention_dropout_rate=float(hf.get("attention_dropout", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)),
        add_pooler=False,
    )


def to_hf(arch: Architecture, cfg: ModelConfig, num_labels: int | None) -> dict[str, Any]:
    errs = []
    if not isinstance(cfg, BertConfig) or cfg.family != "bert":
        errs.append(f"the model config is {type(cfg).__name__} (DistilBERT loads as BertConfig)")
    else:
        if cfg.type_vocab_size != 0:
            errs.append(f"model.type_vocab_size={cfg.type_vocab_size} (DistilBERT has none: 0)")
        if cfg.add_pooler:
            errs.append("model.add_pooler=True (DistilBERT has no pooler)")
        if cfg.norm_eps != EPS:
            errs.append(f"model.norm_eps={cfg.norm_eps} (HF DistilBERT fixes {EPS})")
    if errs:
        raise CheckpointError(f"cannot export as {arch.name}: " + "; ".join(errs))
    convert.check_exportable(arch, cfg, convert.FIXED["bert"])
    out: dict[str, Any] = {
        "model_type": "distilbert",
        "architectures": [arch.name],
        "vocab_size": cfg.vocab_size,
        "dim": cfg.d_model,
        "n_layers": cfg.num_layers,
        "n_heads": cfg.num_heads,
        "hidden_dim": cfg.d_ff,
        "max_position_embeddings": cfg.max_len,
        "activation": ACT_TO_HF[cfg.activation],
        "dropout": cfg.dropout_rate,
        "attention_dropout": cfg.attention_dropout_rate,
        "initializer_range": cfg.init_std,
        "sinusoidal_pos_embds": False,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "dtype": cfg.param_dtype,
    }
    if num_labels is not None:
        out.update(convert.label_maps(num_labels))
    return out


def layout(arch: Architecture, cfg: BertConfig, prefix: str, num_labels: int | None) -> Layout:
    D, N, H, F = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.d_ff
    p = prefix
    dense = convert._dense
    root: Path_ = ("bert",) if arch.head != "none" else ()
    rules = [
        convert._same(
            f"{p}embeddings.word_embeddings.weight",
            (*root, "token_embed", "embedding"),
            (cfg.vocab_size, D),
        ),
        convert._same(
            f"{p}embeddings.position_embeddings.weight",
            (*root, "position_embed", "embedding"),
            (cfg.max_len, D),
        ),
        *convert._norm(f"{p}embeddings.LayerNorm", (*root, "embed_norm"), D),
    ]
    for i in range(cfg.num_layers):
        h = f"{p}transformer.layer.{i}."
        layer = (*root, "encoder", f"layers_{i}")
        for hf_name, name in (("q_lin", "query"), ("k_lin", "key"), ("v_lin", "value")):
            rules += dense(
                h + f"attention.{hf_name}",
                (*layer, "attention", name),
                (D,),
                (N, H),
                transposed=True,
            )
        rules += dense(
            h + "attention.out_lin", (*layer, "attention", "out"), (N, H), (D,), transposed=True
        )
        rules += convert._norm(h + "sa_layer_norm", (*layer, "attention_norm"), D)
        rules += dense(h + "ffn.lin1", (*layer, "mlp", "wi"), (D,), (F,), transposed=True)
        rules += dense(h + "ffn.lin2", (*layer, "mlp", "wo"), (F,), (D,), transposed=True)
        rules += convert._norm(h + "output_layer_norm", (*layer, "mlp_norm"), D)
    tied = {}
    if arch.head == "mlm":
        rules += dense("vocab_transform", ("transform",), (D,), (D,), transposed=True)
        rules += convert._norm("vocab_layer_norm", ("transform_norm",), D)
        rules.append(convert._same("vocab_projector.bias", ("decoder_bias",), (cfg.vocab_size,)))
        tied = {"vocab_projector.weight": f"{p}embeddings.word_embeddings.weight"}
    if arch.head == "tagger":
        rules += dense("classifier", ("classifier",), (D,), (num_labels,), transposed=True)
    if arch.head == "qa":
        rules += convert.span_rules("qa_outputs", D)
    return Layout(
        rules,
        tied,
        ignored=re.compile(r"^(distilbert\.)?embeddings\.position_ids$"),
        heads=re.compile(
            r"^(vocab_transform\.|vocab_layer_norm\.|vocab_projector\.|pre_classifier\."
            r"|classifier\.|qa_outputs\.)"
        ),
    )


def build(arch: Architecture, cfg: BertConfig, num_labels: int | None) -> nn.Module:
    if arch.head == "none":
        return BertModel(cfg)
    if arch.head == "mlm":
        return BertForMaskedLM(cfg)
    if arch.head == "qa":
        return BertForQuestionAnswering(cfg)
    if num_labels is None:
        raise CheckpointError(f"{arch.name} needs num_labels")
    return BertForTokenClassification(cfg, num_labels)


def infer(names: set[str]) -> str:
    if any(n.startswith("vocab_projector.") for n in names):
        return "DistilBertForMaskedLM"
    if any(n.startswith("qa_outputs.") for n in names):
        return "DistilBertForQuestionAnswering"
    if any(n.startswith("pre_classifier.") for n in names):
        return "DistilBertForSequenceClassification"  # refused: not registered
    if any(n.startswith("classifier.") for n in names):
        return "DistilBertForTokenClassification"
    return "DistilBertModel"


def export_as(cfg: ModelConfig, flat: Mapping[Path_, Any]) -> str | None:
    """A BERT without token types exports as DistilBERT (MLM, QA or the bare encoder)."""
    if cfg.family != "bert" or getattr(cfg, "type_vocab_size", None) != 0:
        return None
    roots = {p[0] for p in flat}
    if "qa_outputs" in roots:
        return "DistilBertForQuestionAnswering"
    if "classifier" in roots:
        raise CheckpointError(
            "cannot tell which HF head this DistilBERT classifier is (a token classifier, or a "
            "sequence classifier HF's DistilBertForSequenceClassification cannot express); pass "
            "architecture='DistilBertForTokenClassification' to export a token classifier"
        )
    if "transform" in roots or "decoder_bias" in roots:
        return "DistilBertForMaskedLM"
    return "DistilBertModel"


convert.register_family(
    convert.Family(
        model_type="distilbert",
        lmflax_family="bert",
        anchor="embeddings.",
        describe=functools.partial(convert.describe_by_keys, "distilbert", KEYS),
        config=to_lmflax,
        hf_config=to_hf,
        layout=layout,
        build=build,
        infer=infer,
        export_as=export_as,
    ),
    ARCHS,
)
