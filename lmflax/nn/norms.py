"""LayerNorm and RMSNorm, normalising in float32 whatever the compute dtype."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.nn.util import DType, as_dtype, logical_param


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis. [..., D] -> [..., D]."""

    eps: float = 1e-5
    use_bias: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        scale = logical_param(
            self, "scale", nn.initializers.ones, (D,), ("norm",), self.param_dtype
        )
        y = y * scale.astype(jnp.float32)
        if self.use_bias:
            bias = logical_param(
                self, "bias", nn.initializers.zeros, (D,), ("norm",), self.param_dtype
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(as_dtype(self.dtype))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * scale over the last axis. [..., D] -> [..., D]."""

    eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D = x.shape[-1]
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = logical_param(
            self, "scale", nn.initializers.ones, (D,), ("norm",), self.param_dtype
        )
        return (y * scale.astype(jnp.float32)).astype(as_dtype(self.dtype))


NORMS = ("layernorm", "rmsnorm")


def make_norm(
    kind: str, *, eps: float, dtype: DType, param_dtype: DType, name: str | None = None
) -> nn.Module:
    """Builds the norm named `kind` ('layernorm' or 'rmsnorm')."""
    if kind == "layernorm":
        return LayerNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "rmsnorm":
        return RMSNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"unknown norm {kind!r}; accepted: {NORMS}")
