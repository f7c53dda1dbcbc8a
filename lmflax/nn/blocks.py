"""Encoder and decoder layers and the stacks made of them.

A stack is either unrolled (`layers_0`, `layers_1`, ... in the parameter tree) or, with
`scan_layers=True`, one layer compiled once and scanned over depth (`layers`, every parameter
gaining a leading [L] axis named "layers"). `stack_layers` / `unstack_layers` convert between the
two. `remat` picks what the backward pass recomputes instead of storing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmflax.config.errors import one_of
from lmflax.nn.attention import (
    IMPLEMENTATIONS,
    MultiHeadAttention,
    causal_mask,
    combine_masks,
    head_problems,
    padding_mask,
    segment_mask,
)
from lmflax.nn.feedforward import FeedForward, activation_problems
from lmflax.nn.norms import NORMS, make_norm
from lmflax.nn.positional import RopeScaling
from lmflax.nn.util import as_dtype, constrain

REMAT_POLICIES = ("none", "full", "minimal", "save_dots")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackConfig:
    """Hyperparameters of an encoder or decoder stack (model configs extend this).

    norm_position: 'pre' (x + f(norm(x)), then a final norm) or 'post' (norm(x + f(x)), BERT).
    remat: 'none', 'full' (recompute everything), 'minimal' (keep weight matmul outputs),
    'save_dots' (keep every matmul output), or the name of any `jax.checkpoint_policies` policy.
    dtype is the compute dtype, param_dtype the storage dtype ('float32', 'bfloat16', ...).
    fused_qkv: compute self-attention's q, k, v with one matmul (same parameters; MHA only).
    rope_base / rope_fraction: rotary positions in self-attention (None = off) on the first
    rope_fraction of each head's dimensions (GPT-NeoX's rotary_pct; 1.0 = all).
    rope_scaling: 'none', 'linear' (frequencies / rope_scaling_factor) or 'llama3' (Llama 3.1's
    banded rescaling, with rope_low_freq_factor, rope_high_freq_factor, rope_original_max_len);
    see `lmflax.nn.positional.RopeScaling`.
    qkv_bias / out_bias: biases on attention's q/k/v and output projections (None = use_bias,
    which also governs the feed-forward's). sliding_window: causal self-attention sees only
    the last sliding_window keys (None = all).
    `validate()` lists what is wrong (the layers raise the same messages when built).
    """

    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 256
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    use_bias: bool = True
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    rope_base: float | None = None
    rope_fraction: float = 1.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    sliding_window: int | None = None
    attention_impl: str | None = None
    init_std: float = 0.02
    scale_residual_init: bool = False
    scan_layers: bool = False
    remat: str = "none"
    fused_qkv: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def validate(self, prefix: str = "model.") -> list[str]:
        """The problems of these stack settings as messages (empty = valid); `prefix` names
        the keys ('model.' in a training config)."""
        errs = []
        for name in ("num_layers", "d_model", "num_heads", "d_ff"):
            if getattr(self, name) <= 0:
                errs.append(f"{prefix}{name} must be > 0, got {getattr(self, name)}")
        errs += head_problems_for(self, prefix)
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                errs.append(f"{prefix}{name} must be in [0, 1), got {getattr(self, name)}")
        errs += activation_problems(self.activation, f"{prefix}activation")
        one_of(errs, f"{prefix}norm", self.norm, NORMS)
        one_of(errs, f"{prefix}norm_position", self.norm_position, NORM_POSITIONS)
        one_of(errs, f"{prefix}dtype", self.dtype, DTYPES)
        one_of(errs, f"{prefix}param_dtype", self.param_dtype, DTYPES)
        one_of(errs, f"{prefix}attention_impl", self.attention_impl, (None, *IMPLEMENTATIONS))
        if self.remat not in REMAT_POLICIES:
            try:
                remat_policy(self.remat)
            except ValueError as e:
                errs.append(f"{prefix}remat: {e}")
        if self.rope_base is not None and not self.rope_base > 0:
            errs.append(
                f"{prefix}rope_base must be > 0 (e.g. 10000.0) or None, got {self.rope_base}"
            )
        if not 0.0 < self.rope_fraction <= 1.0:
            errs.append(f"{prefix}rope_fraction must be in (0, 1], got {self.rope_fraction}")
        errs += self.rope_scaling_spec.problems(f"{prefix}rope_scaling")
        defaults = RopeScaling()
        used = {"none": (), "linear": ("factor",), "llama3": tuple(_ROPE_SCALING_KEYS)}
        for key, name in _ROPE_SCALING_KEYS.items():
            value = getattr(self, name)
            if key not in used.get(self.rope_scaling, ()) and value != getattr(defaults, key):
                errs.append(
                    f"{prefix}{name}={value} is not used with {prefix}rope_scaling="
                    f"{self.rope_scaling!r}"
                )
        if self.sliding_window is not None and self.sliding_window < 1:
            errs.append(f"{prefix}sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.norm_eps <= 0:
            errs.append(f"{prefix}norm_eps must be > 0, got {self.norm_eps}")
        return errs

    @property
    def rope_scaling_spec(self) -> RopeScaling:
        """The rope_* scaling fields as one `RopeScaling`."""
        return RopeScaling(
            **{key: getattr(self, name) for key, name in _ROPE_SCALING_KEYS.items()},
            kind=self.rope_scaling,
        )

    @property
    def resolved_qkv_bias(self) -> bool:
        return self.use_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def resolved_out_bias(self) -> bool:
        return self.use_bias if self.out_bias is None else self.out_bias

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


NORM_POSITIONS = ("pre", "post")
# RopeScaling field -> StackConfig field.
_ROPE_SCALING_KEYS = {
    "factor": "rope_scaling_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_len": "rope_original_max_len",
}
DTYPES = ("float32", "bfloat16", "float16")


def head_problems_for(c: StackConfig, prefix: str = "model.") -> list[str]:
    """`head_problems` for a stack config."""
    return head_problems(c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, prefix)


def remat_policy(name: str) -> Any:
    """The `jax.checkpoint` policy for a config name (see StackConfig.remat)."""
    if name == "full":
        return None
    if name == "minimal":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "save_dots":
        return jax.checkpoint_policies.checkpoint_dots
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_"):
        raise ValueError(
            f"unknown remat policy {name!r}; accepted: {REMAT_POLICIES} or a name in "
            "jax.checkpoint_policies"
        )
    return policy


class _Layer(nn.Module):
    config: StackConfig

    def _norm(self, name: str) -> nn.Module:
        c = self.config
        return make_norm(
            c.norm, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name=name
        )

    def _attention(self, name: str, *, rope: bool) -> MultiHeadAttention:
        c = self.config
        return MultiHeadAttention(
            num_heads=c.num_heads,
            head_dim=c.head_dim,
            num_kv_heads=c.num_kv_heads,
            use_bias=c.use_bias,
            dropout_rate=c.attention_dropout_rate,
            rope_base=c.rope_base if rope else None,
            rope_fraction=c.rope_fraction,
            rope_scaling=c.rope_scaling_spec if rope and c.rope_scaling != "none" else None,
            qkv_bias=c.resolved_qkv_bias,
            out_bias=c.resolved_out_bias,
            sliding_window=c.sliding_window if rope else None,
            implementation=c.attention_impl,
            fused_qkv=c.fused_qkv,
            init_std=c.init_std,
            out_init_std=self._out_std(),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name=name,
        )

    def _out_std(self) -> float:
        c = self.config
        if c.scale_residual_init:
            # GPT-2: residual projections start smaller so the stream's variance stays ~1 in depth.
            return c.init_std / float(np.sqrt(2 * c.num_layers))
        return c.init_std

    def _ffn(self) -> FeedForward:
        c = self.config
        return FeedForward(
            d_ff=c.d_ff,
            activation=c.activation,
            use_bias=c.use_bias,
            init_std=c.init_std,
            out_init_std=self._out_std(),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name="mlp",
        )

    def _sublayer(self, x: jax.Array, name: str, f: Any, deterministic: bool) -> jax.Array:
        """One residual sub-layer in the configured norm position."""
        drop = nn.Dropout(self.config.dropout_rate)
        if self.config.norm_position == "pre":
            return x + drop(f(self._norm(f"{name}_norm")(x)), deterministic=deterministic)
        if self.config.norm_position == "post":
            return self._norm(f"{name}_norm")(x + drop(f(x), deterministic=deterministic))
        raise ValueError(
            f"unknown norm_position {self.config.norm_position!r}; accepted: {NORM_POSITIONS}"
        )


class EncoderLayer(_Layer):
    """Bidirectional self-attention + feed-forward. x [B, T, D] -> [B, T, D].

    mask: boolean, broadcastable to [B, N, T, T] (e.g. `padding_mask(valid)` [B, 1, 1, T]).
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool,
    ) -> jax.Array:
        x = constrain(x, ("batch", "length", "embed"))
        attn = self._attention("attention", rope=True)
        x = self._sublayer(
            x,
            "attention",
            lambda h: attn(
                h, mask=mask, bias=bias, positions=positions, deterministic=deterministic
            ),
            deterministic,
        )
        ffn = self._ffn()
        x = self._sublayer(x, "mlp", lambda h: ffn(h, deterministic=deterministic), deterministic)
        return constrain(x, ("batch", "length", "embed"))


class DecoderLayer(_Layer):
    """Causal self-attention, optional cross-attention over `encoded`, feed-forward.

    x [B, T, D], encoded [B, S, D] or None -> [B, T, D]. mask is combined with the causal mask;
    cross_mask (broadcastable to [B, N, T, S]) masks the encoder's padding.
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        positions: jax.Array | None = None,
        encoded: jax.Array | None = None,
        cross_mask: jax.Array | None = None,
        deterministic: bool,
        decode: bool = False,
    ) -> jax.Array:
        x = constrain(x, ("batch", "length", "embed"))
        attn = self._attention("attention", rope=True)
        x = self._sublayer(
            x,
            "attention",
            lambda h: attn(
                h,
                mask=mask,
                bias=bias,
                is_causal=True,
                positions=positions,
                deterministic=deterministic,
                decode=decode,
            ),
            deterministic,
        )
        if encoded is not None:
            cross = self._attention("cross_attention", rope=False)
            x = self._sublayer(
                x,
                "cross_attention",
                lambda h: cross(
                    h, encoded, mask=cross_mask, deterministic=deterministic, decode=decode
                ),
                deterministic,
            )
        ffn = self._ffn()
        x = self._sublayer(x, "mlp", lambda h: ffn(h, deterministic=deterministic), deterministic)
        return constrain(x, ("batch", "length", "embed"))


class _ScanEncoderLayer(EncoderLayer):
    """EncoderLayer with the positional (carry, *broadcast) -> (carry, None) form nn.scan needs."""

    def __call__(self, x, mask, bias, positions, deterministic):  # type: ignore[override]
        y = super().__call__(
            x, mask=mask, bias=bias, positions=positions, deterministic=deterministic
        )
        return y, None


class _ScanDecoderLayer(DecoderLayer):
    """DecoderLayer in nn.scan's positional form."""

    def __call__(  # type: ignore[override]
        self, x, mask, bias, positions, encoded, cross_mask, deterministic, decode
    ):
        y = super().__call__(
            x,
            mask=mask,
            bias=bias,
            positions=positions,
            encoded=encoded,
            cross_mask=cross_mask,
            deterministic=deterministic,
            decode=decode,
        )
        return y, None


def _run_stack(
    module: nn.Module, layer_cls: type[nn.Module], x: jax.Array, args: tuple, static_from: int
) -> jax.Array:
    """Applies config.num_layers layers: scanned or unrolled, rematerialised or not.

    args are the layer's positional arguments after x; those from index `static_from` on are
    Python values (deterministic, decode) that must stay static under remat.
    """
    c: StackConfig = module.config
    cls = layer_cls
    if c.remat != "none":
        static = tuple(range(static_from + 2, len(args) + 2))  # +1 for self, +1 for x
        cls = nn.remat(
            cls, policy=remat_policy(c.remat), prevent_cse=not c.scan_layers, static_argnums=static
        )
    if c.scan_layers:
        scanned = nn.scan(
            cls,
            variable_axes={"params": 0, "cache": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(c, name="layers")(x, *args)
        return x
    for i in range(c.num_layers):
        x, _ = cls(c, name=f"layers_{i}")(x, *args)
    return x


class Encoder(nn.Module):
    """A stack of EncoderLayers (plus a final norm when pre-norm). x [B, T, D] -> [B, T, D]."""

    config: StackConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool,
    ) -> jax.Array:
        c = self.config
        x = x.astype(as_dtype(c.dtype))
        x = _run_stack(self, _ScanEncoderLayer, x, (mask, bias, positions, deterministic), 3)
        if c.norm_position == "pre":
            x = make_norm(
                c.norm, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name="final_norm"
            )(x)
        return x


class Decoder(nn.Module):
    """A stack of causal DecoderLayers (plus a final norm when pre-norm). [B, T, D] -> [B, T, D].

    With `encoded` [B, S, D] every layer cross-attends to it (an encoder-decoder's decoder).
    """

    config: StackConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        positions: jax.Array | None = None,
        encoded: jax.Array | None = None,
        cross_mask: jax.Array | None = None,
        deterministic: bool,
        decode: bool = False,
    ) -> jax.Array:
        c = self.config
        x = x.astype(as_dtype(c.dtype))
        args = (mask, bias, positions, encoded, cross_mask, deterministic, decode)
        x = _run_stack(self, _ScanDecoderLayer, x, args, 5)
        if c.norm_position == "pre":
            x = make_norm(
                c.norm, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name="final_norm"
            )(x)
        return x


_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def stack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Unrolled -> scanned: every {layers_0..layers_{L-1}} group becomes one `layers` subtree
    whose leaves are stacked along a new leading axis. Works on params, grads or optimizer trees.
    """
    out: dict[str, Any] = {}
    indexed = {}
    for key, value in tree.items():
        m = _LAYER_KEY.match(key)
        if m:
            indexed[int(m.group(1))] = value
        elif isinstance(value, Mapping):
            out[key] = stack_layers(value)
        else:
            out[key] = value
    if indexed:
        if sorted(indexed) != list(range(len(indexed))):
            raise ValueError(f"layer indices are not 0..L-1: {sorted(indexed)}")
        layers = [indexed[i] for i in range(len(indexed))]
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned -> unrolled: the inverse of `stack_layers`."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "layers" and isinstance(value, Mapping):
            num = jax.tree.leaves(value)[0].shape[0]
            for i in range(num):
                out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
        elif isinstance(value, Mapping):
            out[key] = unstack_layers(value)
        else:
            out[key] = value
    return out


def decoder_mask(
    segment_ids: jax.Array | None = None, padding: jax.Array | None = None
) -> jax.Array | None:
    """Mask for a decoder's self-attention from packed segment ids [B, T] and/or padding [B, T]
    (causality is added by the layers). Returns [B, 1, T, T] or None."""
    return combine_masks(
        segment_mask(segment_ids) if segment_ids is not None else None,
        padding_mask(padding) if padding is not None else None,
    )


__all__ = [
    "REMAT_POLICIES",
    "Decoder",
    "DecoderLayer",
    "Encoder",
    "EncoderLayer",
    "StackConfig",
    "causal_mask",
    "decoder_mask",
    "remat_policy",
    "stack_layers",
    "unstack_layers",
]
