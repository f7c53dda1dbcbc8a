"""A dense projection with logical axis names on its kernel and bias."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.nn.util import DType, as_dtype, logical_param


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


class LinearParams(nn.Module):
    """The parameters of a `Linear` (same names, shapes, logical axes and initialisers) without
    applying them, so that several projections of one input can run as one matmul
    (`fused_linear`) while the parameter tree stays that of separate `Linear` modules."""

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    use_bias: bool = True
    init_std: float = 0.02
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        kernel = logical_param(
            self,
            "kernel",
            nn.initializers.normal(self.init_std),
            (in_features, *self.features),
            self.axes,
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = logical_param(
                self, "bias", nn.initializers.zeros, self.features, self.axes[1:], self.param_dtype
            )
        return kernel, bias


def fused_linear(
    x: jax.Array, projections: list[LinearParams], dtype: DType = jnp.float32
) -> list[jax.Array]:
    """[p(x) for p in projections] computed as one matmul against the stacked kernels.

    x [..., D]; every projection has the same features F -> a list of [..., *F]. One wide matmul
    ([D] x [P, *F]) uses the matrix units better than P narrow ones and reads x once.
    """
    dtype = as_dtype(dtype)
    params = [p(x.shape[-1]) for p in projections]
    kernel = jnp.stack([k.astype(dtype) for k, _ in params], axis=1)  # [D, P, *F]
    y = jax.lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if params[0][1] is not None:
        y = y + jnp.stack([b.astype(dtype) for _, b in params])
    return [
        y[(Ellipsis, i) + (slice(None),) * len(projections[0].features)] for i in range(len(params))
    ]
