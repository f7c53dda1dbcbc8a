"""Token embedding, usable as the tied output projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.nn.util import DType, Initializer, as_dtype, logical_param


class Embed(nn.Module):
    """A [V, D] table: `__call__` looks rows up, `attend` projects back onto the vocabulary.

    `one_hot=True` computes the lookup as one_hot(ids) @ table. Use it for tiny tables (BERT's two
    token types): the gradient of a gather is a scatter-add that serialises on GPUs when every
    token hits the same row, while the one-hot form's gradient is a small matmul.
    `embedding_init` replaces the default normal(init_std) initializer (e.g. word2vec's uniform
    table, or `lmflax.vectors` pretrained vectors).
    """

    num_embeddings: int
    features: int
    one_hot: bool = False
    init_std: float = 0.02
    embedding_init: Initializer | None = None
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self) -> None:
        self.embedding = logical_param(
            self,
            "embedding",
            self.embedding_init or nn.initializers.normal(self.init_std),
            (self.num_embeddings, self.features),
            self.axes,
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [...] int -> [..., D]."""
        dtype = as_dtype(self.dtype)
        if self.one_hot:
            onehot = jax.nn.one_hot(ids, self.num_embeddings, dtype=dtype)
            return jnp.einsum("...V,VD->...D", onehot, self.embedding.astype(dtype))
        return jnp.take(self.embedding, ids, axis=0).astype(dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> logits [..., V] = x @ tableᵀ (in the compute dtype)."""
        dtype = as_dtype(self.dtype)
        return jnp.einsum("...D,VD->...V", x.astype(dtype), self.embedding.astype(dtype))
