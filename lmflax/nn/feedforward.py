"""The position-wise feed-forward network: act(x W₁ + b₁) W₂ + b₂, or a gated variant."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.config.errors import one_of
from lmflax.nn.linear import Linear
from lmflax.nn.util import DType, constrain

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}
# Gated variants (Shazeer 2020): act(x W) ⊙ (x V), then W₂.
_GATED = {"swiglu": "silu", "geglu": "gelu_tanh", "reglu": "relu"}
ACTIVATIONS = tuple(_ACTIVATIONS) + tuple(_GATED)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise function of a non-gated activation name ('relu', 'gelu', 'gelu_tanh',
    'silu'); ValueError naming the accepted ones otherwise."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; accepted: {tuple(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def activation_problems(name: str, key: str = "activation") -> list[str]:
    """[] if `name` is an accepted FeedForward activation, else one message saying which are."""
    errs: list[str] = []
    one_of(errs, key, name, ACTIVATIONS)
    return errs


class FeedForward(nn.Module):
    """[B, T, D] -> [B, T, D] through a hidden layer of width d_ff.

    activation: relu (the 2017 paper), gelu (BERT, exact erf form), gelu_tanh (GPT-2), silu, or a
    gated form: swiglu, geglu, reglu.
    """

    d_ff: int
    activation: str = "gelu"
    use_bias: bool = True
    dropout_rate: float = 0.0
    init_std: float = 0.02
    out_init_std: float | None = None
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        for problem in activation_problems(self.activation):
            raise ValueError(problem)
        D = x.shape[-1]
        dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = Linear((self.d_ff,), ("embed", "mlp"), init_std=self.init_std, name="wi", **dense)(x)
        if self.activation in _GATED:
            gate = Linear(
                (self.d_ff,), ("embed", "mlp"), init_std=self.init_std, name="wi_gate", **dense
            )(x)
            h = _ACTIVATIONS[_GATED[self.activation]](gate) * h
        else:
            h = _ACTIVATIONS[self.activation](h)
        h = constrain(h, ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        out_std = self.init_std if self.out_init_std is None else self.out_init_std
        return Linear((D,), ("mlp", "embed"), init_std=out_std, name="wo", **dense)(h)
