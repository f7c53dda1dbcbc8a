"""Llama-family decoders <-> lmflax GPT: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

All three are one lmflax `GPT` (lmflax.models.gpt) configured as: rotary positions (with HF's
'default', 'linear' or 'llama3' rope_type), RMSNorm, pre-norm, SwiGLU feed-forward without
biases, grouped-query attention, tied or untied output layer. What differs is in the config:
Llama may have attention / MLP biases (`attention_bias`, `mlp_bias`), Mistral a sliding window,
Qwen2 biases on q/k/v only. Registered into `lmflax.hf.convert`'s registry on import.

Tensors (torch nn.Linear weights are [out, in]; lmflax kernels [in, out], attention q/k/v
[D, N|K, H] and out [N, H, D]):

    model.embed_tokens.weight                  token_embed/embedding
    model.layers.i.input_layernorm.weight      decoder/layers_i/attention_norm/scale
    model.layers.i.self_attn.{q,k,v}_proj      decoder/layers_i/attention/{query,key,value}
    model.layers.i.self_attn.o_proj            decoder/layers_i/attention/out
    model.layers.i.post_attention_layernorm    decoder/layers_i/mlp_norm/scale
    model.layers.i.mlp.{gate,up,down}_proj     decoder/layers_i/mlp/{wi_gate,wi,wo}
    model.norm.weight                          decoder/final_norm/scale
    lm_head.weight                             lm_head/kernel (absent when tied)
"""

from __future__ import annotations

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
from lmflax.models import GPT, GPTConfig
from lmflax.models.config import ModelConfig

MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHS = (
    Architecture("LlamaForCausalLM", "llama", "lm", "model."),
    Architecture("MistralForCausalLM", "mistral", "lm", "model."),
    Architecture("Qwen2ForCausalLM", "qwen2", "lm", "model."),
)
ROPE_TYPES = ("default", "linear", "llama3")
# Defaults of each model_type's HF config class (transformers 5) where they differ.
DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie": False},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "tie": False},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie": False},
}
# lmflax field -> HF key (for mismatch messages).
KEYS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "resolved_kv_heads": "num_key_value_heads",
    "resolved_head_dim": "head_dim",
    "d_ff": "intermediate_size",
    "max_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "sliding_window": "sliding_window",
    "rope_fraction": "partial_rotary_factor",
}
ROPE_KEYS = {
    "rope_base": "rope_theta",
    "rope_scaling": "rope_type",
    "rope_scaling_factor": "factor",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
    "rope_original_max_len": "original_max_position_embeddings",
}


def rope_parameters(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """HF's RoPE settings as one dict with rope_type and rope_theta: transformers 5 writes
    `rope_parameters`, older configs `rope_theta` plus `rope_scaling` (None = plain RoPE)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise CheckpointError(
            f"{source}: per-layer-type RoPE parameters ({', '.join(params)}) are not supported"
        )
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in hf:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    return params


def to_config(
    arch: Architecture, hf: Mapping[str, Any], names: Iterable[str], source: str
) -> ModelConfig:
    """The lmflax GPTConfig of a Llama / Mistral / Qwen2 config.json; CheckpointError naming
    any setting lmflax cannot compute (before any weight is read)."""
    del names
    kind = arch.family
    defaults = DEFAULTS[kind]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(
            f"{source}: hidden_act={act!r} is not supported for {arch.name} (its gated MLP is "
            "SwiGLU: 'silu')"
        )
    rope = rope_parameters(hf, source)
    rope_type = rope["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope_type={rope_type!r} is not supported; supported: {ROPE_TYPES}"
        )
    if float(rope.get("attention_factor", 1.0)) != 1.0:
        raise CheckpointError(
            f"{source}: RoPE attention_factor={rope['attention_factor']} is not supported (1.0)"
        )
    scaling: dict[str, Any] = {}
    if rope_type == "linear":
        scaling = {"rope_scaling_factor": float(_need(rope, "factor", f"{source} rope"))}
    elif rope_type == "llama3":
        scaling = {
            "rope_scaling_factor": float(_need(rope, "factor", f"{source} rope")),
            "rope_low_freq_factor": float(_need(rope, "low_freq_factor", f"{source} rope")),
            "rope_high_freq_factor": float(_need(rope, "high_freq_factor", f"{source} rope")),
            "rope_original_max_len": int(
                rope.get(
                    "original_max_position_embeddings",
                    hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
                )
            ),
        }
    use_bias, qkv_bias, out_bias = False, None, None
    if kind == "llama":
        attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
        use_bias = mlp_bias
        if attention_bias != mlp_bias:
            qkv_bias = out_bias = attention_bias
    elif kind == "qwen2":
        qkv_bias, out_bias = True, False
    window = None
    if kind == "mistral":
        window = hf.get("sliding_window", 4096)
    elif kind == "qwen2":
        layer_types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise CheckpointError(
                f"{source}: Qwen2 with sliding-window layers (use_sliding_window / layer_types "
                f"{sorted(set(layer_types))}) is not supported; supported: full_attention only"
            )
    d_model = _need(hf, "hidden_size", source)
    heads = _need(hf, "num_attention_heads", source)
    head_dim = hf.get("head_dim") or d_model // heads
    return GPTConfig(
        vocab_size=_need(hf, "vocab_size", source),
        d_model=d_model,
        num_layers=_need(hf, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        d_ff=_need(hf, "intermediate_size", source),
        max_len=int(hf.get("max_position_embeddings", defaults["max_position_embeddings"])),
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
        norm_position="pre",
        position="rope",
        rope_base=float(rope["rope_theta"]),
        rope_fraction=float(rope.get("partial_rotary_factor", 1.0)),
        rope_scaling="none" if rope_type == "default" else rope_type,
        **scaling,
        use_bias=use_bias,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        sliding_window=window,
        tie_embeddings=bool(hf.get("tie_word_embeddings", defaults["tie"])),
        scale_residual_init=False,
        dropout_rate=0.0,
        attention_dropout_rate=float(hf.get("attention_dropout", 0.0)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def export_as(cfg: ModelConfig, flat: Mapping[Path_, Any]) -> str | None:
    """A GPT with rotary positions exports as a Llama-family model: Mistral with a sliding
    window, Qwen2 with biases on q/k/v only, Llama otherwise; None for other GPTs (GPT-2)."""
    del flat
    if cfg.position != "rope":
        return None
    if cfg.sliding_window is not None:
        return "MistralForCausalLM"
    if cfg.resolved_qkv_bias and not cfg.resolved_out_bias and not cfg.use_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def to_hf(arch: Architecture, cfg: ModelConfig, num_labels: int | None = None) -> dict[str, Any]:
    """config.json for exporting `cfg` as `arch`; CheckpointError naming every lmflax setting
    that HF's implementation cannot express."""
    del num_labels
    kind = arch.family
    fixed = {
        "family": "gpt",
        "position": "rope",
        "norm": "rmsnorm",
        "norm_position": "pre",
        "activation": "swiglu",
    }
    errs = [
        f"model.{k}={getattr(cfg, k)!r} (HF {arch.name} needs {v!r})"
        for k, v in fixed.items()
        if getattr(cfg, k) != v
    ]
    qkv, out, mlp = cfg.resolved_qkv_bias, cfg.resolved_out_bias, cfg.use_bias
    if kind == "llama" and qkv != out:
        errs.append(f"q/k/v bias {qkv} and output bias {out} (HF Llama's attention_bias sets both)")
    if kind in ("mistral", "qwen2") and mlp:
        errs.append(f"model.use_bias=True (HF {arch.name} has no MLP biases)")
    if kind == "mistral" and (qkv or out):
        errs.append(f"attention biases (HF {arch.name} has none)")
    if kind == "qwen2" and (not qkv or out):
        errs.append(
            f"q/k/v bias {qkv}, output bias {out} (HF Qwen2 has q/k/v biases and no output bias)"
        )
    if kind != "mistral" and cfg.sliding_window is not None:
        errs.append(
            f"model.sliding_window={cfg.sliding_window} (export as MistralForCausalLM instead)"
        )
    if errs:
        raise CheckpointError(f"cannot export as {arch.name}: " + "; ".join(errs))
    rope: dict[str, Any] = {
        "rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
        "rope_theta": cfg.rope_base,
    }
    if cfg.rope_scaling in ("linear", "llama3"):
        rope["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        rope["low_freq_factor"] = cfg.rope_low_freq_factor
        rope["high_freq_factor"] = cfg.rope_high_freq_factor
        rope["original_max_position_embeddings"] = cfg.rope_original_max_len
    if cfg.rope_fraction != 1.0:
        rope["partial_rotary_factor"] = cfg.rope_fraction
    out_cfg: dict[str, Any] = {
        "architectures": [arch.name],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.resolved_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "intermediate_size": cfg.d_ff,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "attention_dropout": cfg.attention_dropout_rate,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_base,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": cfg.param_dtype,
    }
    if cfg.rope_fraction != 1.0:
        out_cfg["partial_rotary_factor"] = cfg.rope_fraction
    if kind == "llama":
        out_cfg["attention_bias"] = qkv
        out_cfg["mlp_bias"] = mlp
    if kind == "mistral":
        out_cfg["sliding_window"] = cfg.sliding_window
    if kind == "qwen2":
        out_cfg["use_sliding_window"] = False
        out_cfg["sliding_window"] = None
        out_cfg["layer_types"] = ["full_attention"] * cfg.num_layers
    return out_cfg


def _rms(name: str, path: Path_, D: int) -> Rule:
    return _same(f"{name}.weight", (*path, "scale"), (D,))


def layout(
    arch: Architecture, cfg: ModelConfig, prefix: str, num_labels: int | None = None
) -> Layout:
    """The tensor rules of a Llama-family checkpoint (see the module docstring)."""
    del arch, num_labels
    D, N, K = cfg.d_model, cfg.num_heads, cfg.resolved_kv_heads
    H, F, p = cfg.resolved_head_dim, cfg.d_ff, prefix
    qkv, out, mlp = cfg.resolved_qkv_bias, cfg.resolved_out_bias, cfg.use_bias
    rules = [_same(f"{p}embed_tokens.weight", ("token_embed", "embedding"), (cfg.vocab_size, D))]
    for i in range(cfg.num_layers):
        h = f"{p}layers.{i}."
        layer = ("decoder", f"layers_{i}")
        attn = (*layer, "attention")
        rules.append(_rms(h + "input_layernorm", (*layer, "attention_norm"), D))
        for hf_name, name, heads in (("q", "query", N), ("k", "key", K), ("v", "value", K)):
            rules += _dense(
                f"{h}self_attn.{hf_name}_proj",
                (*attn, name),
                (D,),
                (heads, H),
                transposed=True,
                bias=qkv,
            )
        rules += _dense(
            h + "self_attn.o_proj", (*attn, "out"), (N, H), (D,), transposed=True, bias=out
        )
        rules.append(_rms(h + "post_attention_layernorm", (*layer, "mlp_norm"), D))
        for hf_name, name, shapes in (
            ("gate", "wi_gate", ((D,), (F,))),
            ("up", "wi", ((D,), (F,))),
            ("down", "wo", ((F,), (D,))),
        ):
            rules += _dense(
                f"{h}mlp.{hf_name}_proj", (*layer, "mlp", name), *shapes, transposed=True, bias=mlp
            )
    rules.append(_rms(f"{p}norm", ("decoder", "final_norm"), D))
    tied = {}
    if cfg.tie_embeddings:
        tied["lm_head.weight"] = f"{p}embed_tokens.weight"
    else:
        rules += _dense(
            "lm_head", ("lm_head",), (D,), (cfg.vocab_size,), transposed=True, bias=False
        )
    return Layout(
        rules,
        tied,
        # The rotary frequency buffers older checkpoints carry.
        ignored=re.compile(r"^(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
        heads=re.compile(r"^(lm_head\.|score\.)"),
    )


def build(arch: Architecture, cfg: ModelConfig, num_labels: int | None = None) -> nn.Module:
    del arch, num_labels
    return GPT(cfg)


def describe(field: str, hf: Mapping[str, Any], derived: Any) -> str:
    """How a Llama-family config.json expresses lmflax `field` (for mismatch messages)."""
    if field in ROPE_KEYS:
        key = ROPE_KEYS[field]
        return f"RoPE {key}={rope_parameters(hf, 'config.json').get(key)!r} (= {derived!r})"
    return describe_key(KEYS, field, hf, derived, hf.get("model_type"))


for _arch in ARCHS:
    register_family(
        Family(
            model_type=_arch.family,
            lmflax_family="gpt",
            anchor="embed_tokens.",
            config=to_config,
            hf_config=to_hf,
            layout=layout,
            build=build,
            describe=describe,
            export_as=export_as,
        ),
        [_arch],
    )
