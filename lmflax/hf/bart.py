"""BART and Marian <-> lmflax encoder-decoder: BartForConditionalGeneration, MarianMTModel.

Both are one lmflax `EncoderDecoder` (lmflax.models.seq2seq), post-norm LayerNorm with biases
everywhere, one token table for encoder, decoder and the tied output, plus a learned
`final_logits_bias`. They differ in positions and embeddings:
- BART: learned positions per stack, stored with an offset of 2 (rows 0 and 1 of HF's table are
  never used; lmflax keeps rows 2.. and exports zeros there), a LayerNorm on the embeddings
  (`layernorm_embedding`), GELU, embeddings scaled by √D only with `scale_embedding`.
- Marian (Helsinki-NLP opus-mt): fixed sinusoids laid out as all sines then all cosines
  (`sinusoidal_layout='halves'`), embeddings scaled by √D, SiLU ('swish'), no embedding norm.
Registered into `lmflax.hf.convert`'s registry on import.

Tensors (torch nn.Linear weights are [out, in]; lmflax kernels [in, out], attention q/k/v
[D, N, H] and out [N, H, D]):

    model.shared.weight                                  token_embed/embedding
    model.{encoder,decoder}.embed_positions.weight       {stack}_position_embed/embedding (BART)
    model.{encoder,decoder}.layernorm_embedding          {stack}_embed_norm (BART)
    model.{stack}.layers.i.self_attn.{q,k,v,out}_proj    {stack}/layers_i/attention/...
    model.{stack}.layers.i.self_attn_layer_norm          {stack}/layers_i/attention_norm
    model.decoder.layers.i.encoder_attn.*                decoder/layers_i/cross_attention/...
    model.decoder.layers.i.encoder_attn_layer_norm       decoder/layers_i/cross_attention_norm
    model.{stack}.layers.i.fc1, fc2                      {stack}/layers_i/mlp/wi, wo
    model.{stack}.layers.i.final_layer_norm              {stack}/layers_i/mlp_norm
    final_logits_bias [1, V]                             final_logits_bias [V]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from lmflax.hf.convert import (
    ACT_FROM_HF,
    ACT_TO_HF,
    Architecture,
    Family,
    Layout,
    Path_,
    Rule,
    _dense,
    _need,
    _norm,
    describe_key,
    register_family,
)
from lmflax.hf.files import CheckpointError
from lmflax.models.config import ModelConfig
from lmflax.models.seq2seq import EncoderDecoder, Seq2SeqConfig

ARCHS = {
    "bart": Architecture("BartForConditionalGeneration", "bart", "lm", "model."),
    "marian": Architecture("MarianMTModel", "marian", "lm", "model."),
}
BART_POSITION_OFFSET = 2
KEYS = {
    "vocab_size": "vocab_size",
    "d_model": "d_model",
    "num_layers": "encoder_layers",
    "decoder_layers": "decoder_layers",
    "num_heads": "encoder_attention_heads",
    "d_ff": "encoder_ffn_dim",
    "max_len": "max_position_embeddings",
    "activation": "activation_function",
    "scale_embeddings": "scale_embedding",
}


def _same_for_both(hf: Mapping[str, Any], source: str) -> None:
    """lmflax's encoder and decoder share width, heads and feed-forward size."""
    pairs = (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    )
    for enc, dec in pairs:
        if enc in hf and dec in hf and hf[enc] != hf[dec]:
            raise CheckpointError(
                f"{source}: {enc}={hf[enc]} differs from {dec}={hf[dec]}; lmflax's encoder and "
                "decoder share these"
            )


def to_config(
    arch: Architecture, hf: Mapping[str, Any], names: Iterable[str], source: str
) -> ModelConfig:
    """The lmflax Seq2SeqConfig of a BART / Marian config.json; CheckpointError naming any
    setting lmflax cannot compute (before any weight is read)."""
    del names
    kind = arch.family
    _same_for_both(hf, source)
    act = hf.get("activation_function", "gelu")
    if act not in ACT_FROM_HF:
        raise CheckpointError(
            f"{source}: activation_function={act!r} is not supported; supported: "
            f"{', '.join(ACT_FROM_HF)}"
        )
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise CheckpointError(
            f"{source}: pre-norm {arch.name} (normalize_before / add_final_layer_norm, mBART's "
            "layout) is not supported"
        )
    if kind == "marian":
        if not hf.get("share_encoder_decoder_embeddings", True):
            raise CheckpointError(
                f"{source}: share_encoder_decoder_embeddings=False (separate source and target "
                "vocabularies) is not supported; lmflax shares one token table"
            )
        if hf.get("decoder_vocab_size", hf["vocab_size"]) != hf["vocab_size"]:
            raise CheckpointError(
                f"{source}: decoder_vocab_size={hf['decoder_vocab_size']} differs from "
                f"vocab_size={hf['vocab_size']}; lmflax shares one token table"
            )
    if not hf.get("tie_word_embeddings", True):
        raise CheckpointError(f"{source}: an untied lm_head is not supported for {arch.name}")
    layers = _need(hf, "encoder_layers", source)
    return Seq2SeqConfig(
        vocab_size=_need(hf, "vocab_size", source),
        d_model=_need(hf, "d_model", source),
        num_layers=layers,
        num_decoder_layers=hf.get("decoder_layers", layers),
        num_heads=_need(hf, "encoder_attention_heads", source),
        d_ff=_need(hf, "encoder_ffn_dim", source),
        max_len=int(_need(hf, "max_position_embeddings", source)),
        activation=ACT_FROM_HF[act],
        norm="layernorm",
        norm_position="post",
        norm_eps=1e-5,
        position="learned" if kind == "bart" else "sinusoidal",
        sinusoidal_layout="interleaved" if kind == "bart" else "halves",
        embed_norm=kind == "bart",
        logits_bias=True,
        use_bias=True,
        scale_embeddings=bool(hf.get("scale_embedding", kind == "marian")),
        scale_logits=False,
        tie_embeddings=True,
        dropout_rate=float(hf.get("dropout", 0.1)),
        attention_dropout_rate=float(hf.get("attention_dropout", 0.0)),
        init_std=float(hf.get("init_std", 0.02)),
    )


def export_as(cfg: ModelConfig, flat: Mapping[Path_, Any]) -> str | None:
    """A post-norm encoder-decoder with a logits bias exports as BART (learned positions) or
    Marian (sinusoids in halves); others are not these architectures."""
    del flat
    if not getattr(cfg, "logits_bias", False) or cfg.norm_position != "post":
        return None
    if cfg.position == "learned":
        return ARCHS["bart"].name
    if cfg.position == "sinusoidal" and cfg.sinusoidal_layout == "halves":
        return ARCHS["marian"].name
    return None


def to_hf(arch: Architecture, cfg: ModelConfig, num_labels: int | None = None) -> dict[str, Any]:
    """config.json for exporting `cfg` as `arch`; CheckpointError naming every lmflax setting
    that HF's implementation cannot express."""
    del num_labels
    assert isinstance(cfg, Seq2SeqConfig)
    kind = arch.family
    fixed: dict[str, Any] = {
        "norm": "layernorm",
        "norm_position": "post",
        "norm_eps": 1e-5,
        "use_bias": True,
        "tie_embeddings": True,
        "logits_bias": True,
        "scale_logits": False,
    }
    if kind == "bart":
        fixed.update(position="learned", embed_norm=True)
    else:
        fixed.update(position="sinusoidal", sinusoidal_layout="halves", embed_norm=False)
    errs = [
        f"model.{k}={getattr(cfg, k)!r} (HF {arch.name} needs {v!r})"
        for k, v in fixed.items()
        if getattr(cfg, k) != v
    ]
    if cfg.activation not in ACT_TO_HF:
        errs.append(f"model.activation={cfg.activation!r} (HF takes {', '.join(ACT_TO_HF)})")
    if cfg.resolved_kv_heads != cfg.num_heads or cfg.resolved_head_dim * cfg.num_heads != (
        cfg.d_model
    ):
        errs.append("grouped-query heads or head_dim * num_heads != d_model (HF has neither)")
    if errs:
        raise CheckpointError(f"cannot export as {arch.name}: " + "; ".join(errs))
    act = "swish" if cfg.activation == "silu" and kind == "marian" else ACT_TO_HF[cfg.activation]
    out = {
        "architectures": [arch.name],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.num_layers,
        "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.num_heads,
        "decoder_attention_heads": cfg.num_heads,
        "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff,
        "max_position_embeddings": cfg.max_len,
        "activation_function": act,
        "scale_embedding": cfg.scale_embeddings,
        "dropout": cfg.dropout_rate,
        "attention_dropout": cfg.attention_dropout_rate,
        "activation_dropout": 0.0,
        "init_std": cfg.init_std,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "pad_token_id": 0 if kind == "marian" else 1,
        "dtype": cfg.param_dtype,
    }
    if kind == "marian":
        out["decoder_vocab_size"] = cfg.vocab_size
        out["share_encoder_decoder_embeddings"] = True
    return out


def _positions(name: str, path: Path_, max_len: int, D: int) -> Rule:
    """BART's learned positions [max_len + 2, D] (rows 0, 1 unused) <-> lmflax's [max_len, D]."""
    off = BART_POSITION_OFFSET
    return Rule(
        (name,),
        ((max_len + off, D),),
        ((*path, "embedding"),),
        ((max_len, D),),
        lambda w: (w[off:],),
        lambda t: (np.concatenate([np.zeros((off, D), t.dtype), np.asarray(t)]),),
    )


def _attention(name: str, path: Path_, D: int, N: int, H: int) -> list[Rule]:
    rules = []
    for hf_name, lm_name in (("q", "query"), ("k", "key"), ("v", "value")):
        rules += _dense(f"{name}.{hf_name}_proj", (*path, lm_name), (D,), (N, H), transposed=True)
    rules += _dense(f"{name}.out_proj", (*path, "out"), (N, H), (D,), transposed=True)
    return rules


def layout(
    arch: Architecture, cfg: ModelConfig, prefix: str, num_labels: int | None = None
) -> Layout:
    """The tensor rules of a BART / Marian checkpoint (see the module docstring)."""
    del num_labels
    assert isinstance(cfg, Seq2SeqConfig)
    D, N, H, F, V = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size
    p = prefix
    rules = [
        Rule(
            (f"{p}shared.weight",),
            ((V, D),),
            (("token_embed", "embedding"),),
            ((V, D),),
            lambda w: (w,),
            lambda w: (w,),
        ),
        Rule(
            ("final_logits_bias",),
            ((1, V),),
            (("final_logits_bias",),),
            ((V,),),
            lambda b: (b.reshape(V),),
            lambda b: (np.asarray(b).reshape(1, V),),
        ),
    ]
    for stack, depth in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        if arch.family == "bart":
            rules.append(
                _positions(
                    f"{p}{stack}.embed_positions.weight",
                    (f"{stack}_position_embed",),
                    cfg.max_len,
                    D,
                )
            )
            rules += _norm(f"{p}{stack}.layernorm_embedding", (f"{stack}_embed_norm",), D)
        for i in range(depth):
            h = f"{p}{stack}.layers.{i}."
            layer = (stack, f"layers_{i}")
            rules += _attention(h + "self_attn", (*layer, "attention"), D, N, H)
            rules += _norm(h + "self_attn_layer_norm", (*layer, "attention_norm"), D)
            if stack == "decoder":
                rules += _attention(h + "encoder_attn", (*layer, "cross_attention"), D, N, H)
                rules += _norm(h + "encoder_attn_layer_norm", (*layer, "cross_attention_norm"), D)
            rules += _dense(h + "fc1", (*layer, "mlp", "wi"), (D,), (F,), transposed=True)
            rules += _dense(h + "fc2", (*layer, "mlp", "wo"), (F,), (D,), transposed=True)
            rules += _norm(h + "final_layer_norm", (*layer, "mlp_norm"), D)
    tied = {
        f"{p}encoder.embed_tokens.weight": f"{p}shared.weight",
        f"{p}decoder.embed_tokens.weight": f"{p}shared.weight",
        "lm_head.weight": f"{p}shared.weight",
    }
    return Layout(
        rules,
        tied,
        # Marian's sinusoids are computed, though older checkpoints store them.
        ignored=re.compile(r"^(model\.)?(encoder|decoder)\.embed_positions\.weight$")
        if arch.family == "marian"
        else re.compile(r"^$"),
        heads=re.compile(r"^lm_head\."),
    )


def build(arch: Architecture, cfg: ModelConfig, num_labels: int | None = None) -> nn.Module:
    del arch, num_labels
    assert isinstance(cfg, Seq2SeqConfig)
    return EncoderDecoder(cfg)


def describe(field: str, hf: Mapping[str, Any], derived: Any) -> str:
    """How a BART / Marian config.json expresses lmflax `field` (for mismatch messages)."""
    return describe_key(KEYS, field, hf, derived, hf.get("model_type"))


for _kind, _arch in ARCHS.items():
    register_family(
        Family(
            model_type=_kind,
            lmflax_family="seq2seq",
            anchor="shared.",
            config=to_config,
            hf_config=to_hf,
            layout=layout,
            build=build,
            describe=describe,
            export_as=export_as,
        ),
        [_arch],
    )
