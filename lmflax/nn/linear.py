"""A dense projection with logical axis names on its kernel and bias."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.nn._util import DType, as_dtype, logical_param


class Linear(nn.Module):
    """x [..., *in_shape] @ kernel [*in_shape, *features] + bias [*features].

    `in_dims` trailing axes of x are contracted (1 for [B, T, D] inputs, 2 for the attention
    output projection's [B, T, N, H]). `axes` names every kernel dimension, inputs first.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    in_dims: int = 1
    use_bias: bool = True
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = as_dtype(self.dtype)
        in_shape = x.shape[-self.in_dims :]
        kernel = logical_param(
            self,
            "kernel",
            nn.initializers.normal(self.init_std),
            (*in_shape, *self.features),
            self.axes,
            self.param_dtype,
        )
        y = jax.lax.dot_general(
            x.astype(dtype),
            kernel.astype(dtype),
            (
                (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims))),
                ((), ()),
            ),
        )
        if self.use_bias:
            bias = logical_param(
                self,
                "bias",
                nn.initializers.zeros,
                self.features,
                self.axes[self.in_dims :],
                self.param_dtype,
            )
            y = y + bias.astype(dtype)
        return y
