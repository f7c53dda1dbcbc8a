"""word2vec (Mikolov et al. 2013): skip-gram and CBOW with negative sampling.

Two [V, D] tables: the input vectors (the word vectors one keeps; word2vec's syn0, initialised
uniform in ±0.5/D) and the output vectors (syn1neg, initialised to zero). A training example
scores its target word and K noise words against the input: the input word's vector (skip-gram)
or the mean of the window's input vectors (CBOW), whose error is then added in full to each of
those vectors, as word2vec.c and gensim do (`context_mean`).

The config subclasses `ModelConfig` so that word2vec runs through the same config loading,
trainer, checkpoints and workdir checks as the Transformers. `vocab_size` is the table size (the
vocabulary's upper bound; a corpus with fewer words above min_count leaves the last rows unused)
and `d_model` the vector size. The Transformer-stack fields it inherits mean nothing here, so
`validate` rejects any value but their defaults rather than silently ignoring it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.models.config import ModelConfig, register_model_config
from lmflax.nn import Embed
from lmflax.nn.util import as_dtype

ARCHITECTURES = ("skipgram", "cbow")
# Fields of ModelConfig that are word2vec's own (everything else is a Transformer setting).
_USED = {"vocab_size", "d_model", "dtype", "param_dtype"}


@register_model_config
@dataclasses.dataclass(frozen=True, kw_only=True)
class Word2VecConfig(ModelConfig):
    """word2vec's hyperparameters (the same names and defaults as the original tool and gensim).

    architecture: 'skipgram' (a context word predicts the centre word) or 'cbow' (the mean of the
    window's words predicts it). window: the maximum distance; each centre word draws its window
    uniformly from 1..window. negatives: noise words per example, drawn from the unigram
    distribution raised to ns_exponent. sample: the subsampling threshold (0 = off).
    min_count: rarer words are dropped from the text. lowercase: fold case before counting.
    """

    family = "word2vec"
    architecture: str = "skipgram"
    vocab_size: int = 16384
    d_model: int = 100
    window: int = 5
    negatives: int = 5
    min_count: int = 5
    sample: float = 1e-3
    ns_exponent: float = 0.75
    lowercase: bool = True
    position: str = "none"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0

    @property
    def num_inputs(self) -> int:
        """Input words per example: 1 for skip-gram, the whole window (2·window) for CBOW."""
        return 2 * self.window if self.architecture == "cbow" else 1

    def validate(self) -> list[str]:
        errs = []
        for name in ("vocab_size", "d_model", "window", "negatives", "min_count"):
            if getattr(self, name) <= 0:
                errs.append(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.architecture not in ARCHITECTURES:
            errs.append(
                f"model.architecture is {self.architecture!r}; accepted: "
                + ", ".join(repr(a) for a in ARCHITECTURES)
            )
        if self.sample < 0:
            errs.append(f"model.sample must be >= 0 (0 = no subsampling), got {self.sample}")
        if self.ns_exponent < 0:
            errs.append(f"model.ns_exponent must be >= 0, got {self.ns_exponent}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                errs.append(
                    f"model.{name} is {getattr(self, name)!r}; accepted: 'float32', 'bfloat16', "
                    "'float16'"
                )
        for f in dataclasses.fields(ModelConfig):
            if f.name in _USED:
                continue
            g = next(g for g in dataclasses.fields(self) if g.name == f.name)
            default = g.default if g.default is not dataclasses.MISSING else g.default_factory()
            if getattr(self, f.name) != default:
                errs.append(
                    f"model.{f.name}={getattr(self, f.name)!r} is a Transformer setting that "
                    f"word2vec does not use; leave it at {default!r}"
                )
        return errs


@jax.custom_vjp
def context_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, C, D], mask [B, C] -> the masked mean of the C vectors [B, D], with word2vec's
    gradient: each unmasked input vector receives the *whole* gradient of the mean, not 1/count
    of it.

    This is word2vec.c's CBOW update (and gensim's with cbow_mean=1): the forward pass averages
    the context vectors (neu1 /= cw), but the error accumulated for that average (neu1e) is then
    added to every context vector unscaled. Differentiating through the mean would move each of
    them by neu1e / cw, C times slower at the same α. For skip-gram (C = 1) both are the same.
    """
    return _masked_mean(x, mask)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(x.dtype)
    return jnp.einsum("BCD,BC->BD", x, mask) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)


def _context_mean_fwd(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _masked_mean(x, mask), mask


def _context_mean_bwd(mask: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    gx = g[:, None, :] * mask.astype(g.dtype)[:, :, None]  # [B, C, D]: neu1e to each input
    return gx, jnp.zeros_like(mask)


context_mean.defvjp(_context_mean_fwd, _context_mean_bwd)


def _uniform(scale: float) -> nn.initializers.Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


class Word2Vec(nn.Module):
    """inputs [B, C] int, input_mask [B, C], candidates [B, M] int -> logits [B, M] (float32).

    The input representation is the masked mean of the C input vectors (C = 1 for skip-gram);
    logit m is its dot product with candidate m's output vector. Gradients follow word2vec.c:
    each of the C input vectors gets the full gradient of the mean (`context_mean`).
    """

    config: Word2VecConfig

    def setup(self) -> None:
        c = self.config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.input_embed = Embed(
            c.vocab_size, c.d_model, embedding_init=_uniform(0.5 / c.d_model), **common
        )
        self.output_embed = Embed(
            c.vocab_size, c.d_model, embedding_init=nn.initializers.zeros, **common
        )

    def __call__(
        self, inputs: jax.Array, input_mask: jax.Array, candidates: jax.Array
    ) -> jax.Array:
        x = self.input_embed(inputs)  # [B, C, D]
        h = context_mean(x, input_mask.astype(as_dtype(self.config.dtype)))  # word2vec's update
        u = self.output_embed(candidates)  # [B, M, D]
        return jnp.einsum("BD,BMD->BM", h, u).astype(jnp.float32)


PRESETS = {
    "word2vec_tiny": Word2VecConfig(vocab_size=1024, d_model=16),
    "word2vec": Word2VecConfig(),
}
