"""T5 <-> lmflax encoder-decoder: T5ForConditionalGeneration (v1.0 and the gated v1.1 / Flan).

Both are one lmflax `EncoderDecoder` (lmflax.models.seq2seq) with T5's recipe: relative position
buckets (one bias table per stack, shared by its layers), pre-norm RMSNorm, no biases, one token
table for encoder and decoder. v1.0 has a relu feed-forward and a tied output scaled by D^-½;
v1.1 ('gated-gelu') a GeGLU feed-forward and an untied output. Registered into
`lmflax.hf.convert`'s registry on import.

T5 does not divide attention logits by √H; lmflax does, so the query kernels are stored
multiplied by √H (and divided again on export): the logits are the same numbers.

Tensors (torch nn.Linear weights are [out, in]; lmflax kernels [in, out], attention q/k/v
[D, N, H] and out [N, H, D]):

    shared.weight                                       token_embed/embedding
    {encoder,decoder}.block.0.layer.0.SelfAttention.
        relative_attention_bias.weight                  {encoder,decoder}_relative_bias/embedding
    encoder.block.i.layer.0.SelfAttention.{q,k,v,o}     encoder/layers_i/attention/{query,...}
    encoder.block.i.layer.0.layer_norm                  encoder/layers_i/attention_norm/scale
    encoder.block.i.layer.1.DenseReluDense.wi           encoder/layers_i/mlp/wi (gated: wi_0 ->
                                                        wi_gate, wi_1 -> wi), .wo -> mlp/wo
    encoder.block.i.layer.1.layer_norm                  encoder/layers_i/mlp_norm/scale
    decoder.block.i.layer.1.EncDecAttention.{q,k,v,o}   decoder/layers_i/cross_attention/...
    decoder.block.i.layer.{0,1,2}.layer_norm            attention_norm, cross_attention_norm,
                                                        mlp_norm
    {encoder,decoder}.final_layer_norm                  {encoder,decoder}/final_norm/scale
    lm_head.weight                                      lm_head/kernel (absent when tied)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn

from lmflax.hf.convert import (
    Architecture,
    Family,
    Layout,
    Path_,
    Rule,
    _dense,
    _need,
    _same,
    describe_key,
    register_family,
)
from lmflax.hf.files import CheckpointError
from lmflax.models.config import ModelConfig
from lmflax.models.seq2seq import EncoderDecoder, Seq2SeqConfig

ARCH = Architecture("T5ForConditionalGeneration", "t5", "lm", "")
# HF feed_forward_proj -> lmflax activation (HF maps 'gated-gelu' to the tanh GELU, gelu_new).
FEED_FORWARD = {
    "relu": "relu",
    "gelu": "gelu",
    "gated-gelu": "geglu",
    "gated-silu": "swiglu",
    "gated-relu": "reglu",
}
ACTIVATION_TO_HF = {v: k for k, v in FEED_FORWARD.items()}
KEYS = {
    "vocab_size": "vocab_size",
    "d_model": "d_model",
    "num_layers": "num_layers",
    "num_decoder_layers": "num_decoder_layers",
    "decoder_layers": "num_decoder_layers",
    "num_heads": "num_heads",
    "resolved_head_dim": "d_kv",
    "d_ff": "d_ff",
    "norm_eps": "layer_norm_epsilon",
    "activation": "feed_forward_proj",
    "tie_embeddings": "tie_word_embeddings",
    "relative_buckets": "relative_attention_num_buckets",
    "relative_max_distance": "relative_attention_max_distance",
}


def to_config(
    arch: Architecture, hf: Mapping[str, Any], names: Iterable[str], source: str
) -> ModelConfig:
    """The lmflax Seq2SeqConfig of a T5 config.json; CheckpointError naming any setting lmflax
    cannot compute (before any weight is read).

    The output layer: a checkpoint with its own `lm_head.weight` is untied (T5 v1.1 as
    published), else tied to `shared`. Scaling the decoder output by D^-½: transformers 5
    writes `scale_decoder_outputs`; older configs said it with `tie_word_embeddings`."""
    del arch
    untied = "lm_head.weight" in set(names)
    scale = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))
    if untied and scale:
        raise CheckpointError(
            f"{source}: an untied lm_head with scale_decoder_outputs=True is not supported "
            "(lmflax scales the output only when it is tied)"
        )
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in FEED_FORWARD:
        raise CheckpointError(
            f"{source}: feed_forward_proj={proj!r} is not supported; supported: "
            f"{', '.join(FEED_FORWARD)}"
        )
    if proj == "gelu" and hf.get("dense_act_fn", "gelu") != "gelu":
        raise CheckpointError(f"{source}: dense_act_fn={hf['dense_act_fn']!r} is not supported")
    layers = _need(hf, "num_layers", source)
    return Seq2SeqConfig(
        vocab_size=_need(hf, "vocab_size", source),
        d_model=_need(hf, "d_model", source),
        num_layers=layers,
        num_decoder_layers=hf.get("num_decoder_layers") or layers,
        num_heads=_need(hf, "num_heads", source),
        head_dim=_need(hf, "d_kv", source),
        d_ff=_need(hf, "d_ff", source),
        max_len=int(hf.get("n_positions", 512)),
        activation=FEED_FORWARD[proj],
        norm="rmsnorm",
        norm_position="pre",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        position="relative",
        relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        use_bias=False,
        scale_embeddings=False,
        tie_embeddings=not untied,
        scale_logits=scale,
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        attention_dropout_rate=float(hf.get("dropout_rate", 0.1)),
        init_std=float(hf.get("initializer_factor", 1.0)) * 0.02,
    )


def export_as(cfg: ModelConfig, flat: Mapping[Path_, Any]) -> str | None:
    """An encoder-decoder with relative positions exports as T5; others have no HF form here."""
    del flat
    return ARCH.name if getattr(cfg, "position", None) == "relative" else None


def to_hf(arch: Architecture, cfg: ModelConfig, num_labels: int | None = None) -> dict[str, Any]:
    """config.json for exporting `cfg` as T5; CheckpointError naming every lmflax setting that
    HF's T5 cannot express."""
    del num_labels
    assert isinstance(cfg, Seq2SeqConfig)
    fixed = {
        "position": "relative",
        "norm": "rmsnorm",
        "norm_position": "pre",
        "use_bias": False,
        "scale_embeddings": False,
    }
    errs = [
        f"model.{k}={getattr(cfg, k)!r} (HF {arch.name} needs {v!r})"
        for k, v in fixed.items()
        if getattr(cfg, k) != v
    ]
    if cfg.activation not in ACTIVATION_TO_HF:
        errs.append(
            f"model.activation={cfg.activation!r} (HF T5 takes {', '.join(ACTIVATION_TO_HF)})"
        )
    if not cfg.tie_embeddings and cfg.scale_logits:
        errs.append("model.scale_logits=True with an untied output (lmflax ignores it there)")
    if cfg.resolved_kv_heads != cfg.num_heads:
        errs.append(f"model.num_kv_heads={cfg.num_kv_heads} (HF T5 has no grouped-query heads)")
    if errs:
        raise CheckpointError(f"cannot export as {arch.name}: " + "; ".join(errs))
    return {
        "architectures": [arch.name],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.resolved_head_dim,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "dropout_rate": cfg.dropout_rate,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": ACTIVATION_TO_HF[cfg.activation],
        "is_encoder_decoder": True,
        # An untied lm_head is said the pre-transformers-5 way (tie_word_embeddings=False), which
        # transformers 5 reads as 'no output scaling' and unties because lm_head.weight exists.
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.scale_logits,
        "n_positions": cfg.max_len,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "dtype": cfg.param_dtype,
    }


def _query(name: str, path: Path_, D: int, N: int, H: int) -> Rule:
    """T5's q (no 1/√H in its attention) -> lmflax's query kernel times √H."""
    scale = math.sqrt(H)
    return Rule(
        (f"{name}.weight",),
        ((N * H, D),),
        ((*path, "kernel"),),
        ((D, N, H),),
        lambda w: ((w.T * scale).reshape(D, N, H),),
        lambda k: ((k.reshape(D, N * H) / scale).T,),
    )


def _attention(name: str, path: Path_, D: int, N: int, H: int) -> list[Rule]:
    rules = [_query(f"{name}.q", (*path, "query"), D, N, H)]
    for hf_name, lm_name in (("k", "key"), ("v", "value")):
        rules += _dense(
            f"{name}.{hf_name}", (*path, lm_name), (D,), (N, H), transposed=True, bias=False
        )
    rules += _dense(f"{name}.o", (*path, "out"), (N, H), (D,), transposed=True, bias=False)
    return rules


def _ffn(name: str, path: Path_, D: int, F: int, gated: bool) -> list[Rule]:
    inner = (("wi_0", "wi_gate"), ("wi_1", "wi")) if gated else (("wi", "wi"),)
    rules = []
    for hf_name, lm_name in inner:
        rules += _dense(
            f"{name}.{hf_name}", (*path, lm_name), (D,), (F,), transposed=True, bias=False
        )
    rules += _dense(f"{name}.wo", (*path, "wo"), (F,), (D,), transposed=True, bias=False)
    return rules


def _rms(name: str, path: Path_, D: int) -> Rule:
    return _same(f"{name}.weight", (*path, "scale"), (D,))


def layout(
    arch: Architecture, cfg: ModelConfig, prefix: str, num_labels: int | None = None
) -> Layout:
    """The tensor rules of a T5 checkpoint (see the module docstring)."""
    del arch, prefix, num_labels
    assert isinstance(cfg, Seq2SeqConfig)
    D, N, H, F = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.d_ff
    gated = cfg.activation in ("geglu", "swiglu", "reglu")
    rules = [_same("shared.weight", ("token_embed", "embedding"), (cfg.vocab_size, D))]
    for stack, depth in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        rules.append(
            _same(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                (f"{stack}_relative_bias", "embedding"),
                (cfg.relative_buckets, N),
            )
        )
        for i in range(depth):
            h = f"{stack}.block.{i}.layer."
            layer = (stack, f"layers_{i}")
            rules += _attention(h + "0.SelfAttention", (*layer, "attention"), D, N, H)
            rules.append(_rms(h + "0.layer_norm", (*layer, "attention_norm"), D))
            ff = 1
            if stack == "decoder":
                rules += _attention(h + "1.EncDecAttention", (*layer, "cross_attention"), D, N, H)
                rules.append(_rms(h + "1.layer_norm", (*layer, "cross_attention_norm"), D))
                ff = 2
            rules += _ffn(f"{h}{ff}.DenseReluDense", (*layer, "mlp"), D, F, gated)
            rules.append(_rms(f"{h}{ff}.layer_norm", (*layer, "mlp_norm"), D))
        rules.append(_rms(f"{stack}.final_layer_norm", (stack, "final_norm"), D))
    tied = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }
    if cfg.tie_embeddings:
        tied["lm_head.weight"] = "shared.weight"
    else:
        rules += _dense(
            "lm_head", ("lm_head",), (D,), (cfg.vocab_size,), transposed=True, bias=False
        )
    return Layout(rules, tied, ignored=re.compile(r"^$"), heads=re.compile(r"^lm_head\."))


def build(arch: Architecture, cfg: ModelConfig, num_labels: int | None = None) -> nn.Module:
    del arch, num_labels
    assert isinstance(cfg, Seq2SeqConfig)
    return EncoderDecoder(cfg)


def describe(field: str, hf: Mapping[str, Any], derived: Any) -> str:
    """How a T5 config.json expresses lmflax `field` (for mismatch messages)."""
    return describe_key(KEYS, field, hf, derived, "T5")


register_family(
    Family(
        model_type="t5",
        lmflax_family="seq2seq",
        anchor="shared.",
        config=to_config,
        hf_config=to_hf,
        layout=layout,
        build=build,
        describe=describe,
        export_as=export_as,
    ),
    [ARCH],
)
