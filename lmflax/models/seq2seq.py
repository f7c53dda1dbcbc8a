"""Encoder-decoder Transformers: the original (Vaswani et al. 2017) and a T5-style variant.

One family, `seq2seq`, covers both; the presets pick the recipe:
- the Transformer: sinusoidal positions added to √D-scaled embeddings, post-norm LayerNorm,
  relu feed-forward with biases, one embedding table shared by source, target and output.
- T5-style: no absolute positions but a learned relative position bias (log-bucketed
  distances, bidirectional in the encoder, causal in the decoder) added to every self-attention
  layer's logits, pre-norm RMSNorm, no biases, tied output scaled by D^-½.

Inputs are right- or left-padded; `inputs_mask` / `decoder_mask` (1 = real token) keep padding out
of every attention, and positions count real tokens only, so padding never changes a real
token's output.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.models.config import ModelConfig, register_model_config
from lmflax.nn import (
    Decoder,
    Embed,
    Encoder,
    LearnedPositions,
    Linear,
    make_norm,
    padding_mask,
    sinusoidal_positions,
)
from lmflax.nn.util import as_dtype, constrain, logical_param

POSITIONS = ("sinusoidal", "learned", "relative", "rope", "none")
SINUSOIDAL_LAYOUTS = ("interleaved", "halves")


def sinusoidal_table(length: int, dim: int, layout: str = "interleaved") -> jax.Array:
    """[length, dim] float32 sinusoids: the paper's interleaved table, or with layout='halves'
    the same angles as sin(p / 10000^(2i/dim)) for i < dim/2 followed by their cosines."""
    table = sinusoidal_positions(length, dim)
    if layout == "halves":
        table = jnp.concatenate([table[:, 0::2], table[:, 1::2]], axis=-1)
    return table


@register_model_config
@dataclasses.dataclass(frozen=True, kw_only=True)
class Seq2SeqConfig(ModelConfig):
    """An encoder-decoder. Defaults are the Transformer base model's (Vaswani et al. 2017).

    num_layers is the encoder's depth; num_decoder_layers the decoder's (None = num_layers).
    position: 'sinusoidal', 'learned', 'relative' (T5's bucketed bias), 'rope' or 'none'.
    relative_buckets / relative_max_distance: T5's bucketing (half the buckets per direction in
    the bidirectional encoder; exact up to buckets/4 resp. /2, log-spaced up to the distance).
    scale_embeddings multiplies token embeddings by √D (and initialises them with std D^-½);
    scale_logits multiplies tied output logits by D^-½ (T5).
    sinusoidal_layout: 'interleaved' (the paper's: sin, cos, sin, ... along the features) or
    'halves' (all sines, then all cosines: Marian's).
    embed_norm: a norm (of kind `norm`) on the embedded inputs of each stack, before its first
    layer (BART's layernorm_embedding). logits_bias: a learned [V] bias added to the output
    logits (BART's and Marian's final_logits_bias).
    """

    family = "seq2seq"
    vocab_size: int = 37000
    max_len: int = 256
    num_layers: int = 6
    num_decoder_layers: int | None = None
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    activation: str = "relu"
    norm_position: str = "post"
    norm_eps: float = 1e-6
    position: str = "sinusoidal"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    scale_embeddings: bool = True
    scale_logits: bool = False
    sinusoidal_layout: str = "interleaved"
    embed_norm: bool = False
    logits_bias: bool = False
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    def validate(self) -> list[str]:
        # The shared checks know the absolute position kinds only; judge 'relative' here.
        relative = self.position == "relative"
        errs = ModelConfig.validate(
            dataclasses.replace(self, position="none") if relative else self
        )
        if self.position not in POSITIONS:
            errs = [e for e in errs if not e.startswith("model.position is")]
            errs.append(
                f"model.position is {self.position!r}; accepted for seq2seq: "
                + ", ".join(repr(p) for p in POSITIONS)
            )
        if self.sinusoidal_layout not in SINUSOIDAL_LAYOUTS:
            errs.append(
                f"model.sinusoidal_layout is {self.sinusoidal_layout!r}; accepted: "
                + ", ".join(repr(x) for x in SINUSOIDAL_LAYOUTS)
            )
        elif self.sinusoidal_layout != "interleaved" and self.position != "sinusoidal":
            errs.append(
                f"model.sinusoidal_layout={self.sinusoidal_layout!r} needs "
                f"model.position='sinusoidal', got {self.position!r}"
            )
        if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
            errs.append(
                f"model.num_decoder_layers must be > 0 or None, got {self.num_decoder_layers}"
            )
        if relative:
            if self.relative_buckets < 4 or self.relative_buckets % 2:
                errs.append(
                    f"model.relative_buckets must be even and >= 4, got {self.relative_buckets}"
                )
            elif self.relative_max_distance <= self.relative_buckets // 2:
                errs.append(
                    f"model.relative_max_distance ({self.relative_max_distance}) must exceed "
                    f"relative_buckets / 2 ({self.relative_buckets // 2})"
                )
        return errs


def relative_position_bucket(
    relative_position: jax.Array,
    *,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jax.Array:
    """T5's bucket of each relative position (key position - query position), int32.

    Bidirectional: half the buckets for keys before the query, half (offset by num_buckets/2) for
    keys after it. Causal: only keys at or before the query get distinct buckets (later ones fall
    in bucket 0 with distance 0; the causal mask hides them anyway). Within a direction the first
    max_exact = buckets/2 distances get a bucket each and larger distances share log-spaced
    buckets up to max_distance; farther ones share the last bucket. Computed in float32 as T5 did.
    """
    n = -relative_position.astype(jnp.int32)  # how far back the key lies
    ret = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    scaled = jnp.log(jnp.maximum(n, max_exact).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(n < max_exact, n, large)


class RelativePositionBias(nn.Module):
    """A learned bias per (bucket of key - query distance, head), shared by every layer of a stack.

    q_positions [B|1, T], kv_positions [B|1, S] -> bias [B|1, N, T, S] in float32.
    """

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    init_std: float = 0.02
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
        table = logical_param(
            self,
            "embedding",
            nn.initializers.normal(self.init_std),
            (self.num_buckets, self.num_heads),
            # No mesh rule names "relpos_buckets": the small table stays replicated.
            ("relpos_buckets", "heads"),
            self.param_dtype,
        )
        rel = kv_positions[:, None, :] - q_positions[:, :, None]  # [B, T, S]
        buckets = relative_position_bucket(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [B, T, S, N]
        return jnp.transpose(bias, (0, 3, 1, 2))


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """mask [B, T] (1 = real token) -> positions [B, T] counting real tokens from 0 (padding
    before the first real token gets 0), so left padding leaves every real position unchanged."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class EncoderDecoder(nn.Module):
    """inputs [B, S] and decoder_inputs [B, T] (targets shifted right) -> logits [B, T, V].

    `encode` and `decode` run the halves separately (what decoding does: encode once, then
    decode with `decode=True` against the KV cache; see lmflax.decode).
    """

    config: Seq2SeqConfig

    def setup(self) -> None:
        c = self.config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        embed_std = c.d_model**-0.5 if c.scale_embeddings else c.init_std
        # One table for source tokens, target tokens and (tied) the output projection.
        self.token_embed = Embed(c.vocab_size, c.d_model, init_std=embed_std, **common)
        if c.position == "learned":
            self.encoder_position_embed = LearnedPositions(
                c.max_len, c.d_model, init_std=c.init_std, **common
            )
            self.decoder_position_embed = LearnedPositions(
                c.max_len, c.d_model, init_std=c.init_std, **common
            )
        if c.position == "relative":
            bias = dict(
                num_heads=c.num_heads,
                num_buckets=c.relative_buckets,
                max_distance=c.relative_max_distance,
                init_std=c.init_std,
                param_dtype=c.param_dtype,
            )
            self.encoder_relative_bias = RelativePositionBias(bidirectional=True, **bias)
            self.decoder_relative_bias = RelativePositionBias(bidirectional=False, **bias)
        if c.embed_norm:
            self.encoder_embed_norm = make_norm(c.norm, eps=c.norm_eps, **common)
            self.decoder_embed_norm = make_norm(c.norm, eps=c.norm_eps, **common)
        if c.logits_bias:
            self.final_logits_bias = self.param(
                "final_logits_bias", nn.initializers.zeros_init(), (c.vocab_size,), c.param_dtype
            )
        self.embed_dropout = nn.Dropout(c.dropout_rate)
        self.encoder = Encoder(c)
        self.decoder = Decoder(dataclasses.replace(c, num_layers=c.decoder_layers))
        if not c.tie_embeddings:
            self.lm_head = Linear(
                (c.vocab_size,), ("embed", "vocab"), use_bias=False, init_std=c.init_std, **common
            )

    def __call__(
        self,
        inputs: jax.Array,
        decoder_inputs: jax.Array,
        *,
        inputs_mask: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        decoder_mask: jax.Array | None = None,
        deterministic: bool,
        return_hidden: bool = False,
    ) -> jax.Array:
        """inputs [B, S], decoder_inputs [B, T] -> logits [B, T, V] (hidden [B, T, D])."""
        encoded = self.encode(inputs, inputs_mask=inputs_mask, deterministic=deterministic)
        return self.decode(
            encoded,
            decoder_inputs,
            inputs_mask=inputs_mask,
            decoder_positions=decoder_positions,
            decoder_mask=decoder_mask,
            deterministic=deterministic,
            return_hidden=return_hidden,
        )

    def _embed(self, ids: jax.Array, positions: jax.Array, table: str) -> jax.Array:
        c = self.config
        x = self.token_embed(ids)
        if c.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(c.d_model), x.dtype)
        if c.position == "sinusoidal":
            pe = jnp.take(
                sinusoidal_table(c.max_len, c.d_model, c.sinusoidal_layout), positions, axis=0
            )
            x = x + pe.astype(x.dtype)
        elif c.position == "learned":
            x = x + getattr(self, f"{table}_position_embed")(positions)
        if c.embed_norm:
            x = getattr(self, f"{table}_embed_norm")(x)
        return x

    def encode(
        self, inputs: jax.Array, *, inputs_mask: jax.Array | None = None, deterministic: bool
    ) -> jax.Array:
        """inputs [B, S] int (+ inputs_mask [B, S], 1 = real token) -> encoded [B, S, D]."""
        c = self.config
        if inputs_mask is None:
            positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
            mask = None
        else:
            positions = positions_from_mask(inputs_mask)
            mask = padding_mask(inputs_mask)
        x = self._embed(inputs, positions, "encoder")
        x = self.embed_dropout(x, deterministic=deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        bias = (
            self.encoder_relative_bias(positions, positions) if c.position == "relative" else None
        )
        return self.encoder(
            x, mask=mask, bias=bias, positions=positions, deterministic=deterministic
        )

    def decode(
        self,
        encoded: jax.Array,
        decoder_inputs: jax.Array,
        *,
        inputs_mask: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        decoder_mask: jax.Array | None = None,
        deterministic: bool,
        decode: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        """encoded [B, S, D], decoder_inputs [B, T] -> logits [B, T, V].

        inputs_mask [B, S]: the encoder's padding (hidden from cross-attention).
        decoder_mask [B, K] (1 = real token): the keys the decoder's self-attention may see: its
        own T inputs (K = T), or with decode=True the whole cache (K = cache length; left-padded
        prompts). decoder_positions [B, T] default to counting real tokens; with decode=True and
        a decoder_mask they must be given (the step's place in the sequence).
        """
        c = self.config
        T = decoder_inputs.shape[1]
        if decoder_positions is None:
            if decode and decoder_mask is not None and decoder_mask.shape[1] != T:
                raise ValueError(
                    "decode=True against a cache needs decoder_positions [B, T] (the positions "
                    "of the new tokens)"
                )
            decoder_positions = (
                positions_from_mask(decoder_mask)
                if decoder_mask is not None
                else jnp.broadcast_to(jnp.arange(T), decoder_inputs.shape)
            )
        x = self._embed(decoder_inputs, decoder_positions, "decoder")
        x = self.embed_dropout(x, deterministic=deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        bias = None
        if c.position == "relative":
            if decoder_mask is not None:
                kv_positions = positions_from_mask(decoder_mask)
            elif decode and not self.is_initializing():
                raise ValueError(
                    "relative positions with decode=True need decoder_mask [B, cache_len] to "
                    "place the cached keys"
                )
            else:
                kv_positions = jnp.broadcast_to(jnp.arange(T), decoder_inputs.shape)
            bias = self.decoder_relative_bias(decoder_positions, kv_positions)
        x = self.decoder(
            x,
            mask=padding_mask(decoder_mask) if decoder_mask is not None else None,
            bias=bias,
            positions=decoder_positions,
            encoded=encoded,
            cross_mask=padding_mask(inputs_mask) if inputs_mask is not None else None,
            deterministic=deterministic,
            decode=decode,
        )
        if return_hidden:
            return x
        return self.logits(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] in the compute dtype."""
        c = self.config
        if c.tie_embeddings:
            logits = self.token_embed.attend(hidden)
            if c.scale_logits:
                logits = logits * jnp.asarray(c.d_model**-0.5, logits.dtype)
        else:
            logits = self.lm_head(hidden)
        if c.logits_bias:
            logits = logits + self.final_logits_bias.astype(logits.dtype)
        return constrain(logits, ("batch", "length", "vocab")).astype(as_dtype(c.dtype))


_T5 = dict(
    position="relative",
    norm="rmsnorm",
    norm_position="pre",
    norm_eps=1e-6,
    activation="relu",
    use_bias=False,
    scale_embeddings=False,
    scale_logits=True,
)

PRESETS = {
    "transformer_tiny": Seq2SeqConfig(
        vocab_size=2048,
        num_layers=2,
        d_model=64,
        num_heads=4,
        d_ff=256,
        max_len=256,
        dropout_rate=0.0,
    ),
    # Vaswani et al. 2017, Table 3: base (65M with their 37k shared BPE vocabulary) and big.
    "transformer_base": Seq2SeqConfig(),
    "transformer_big": Seq2SeqConfig(d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3),
    "t5_tiny": Seq2SeqConfig(
        vocab_size=2048,
        num_layers=2,
        d_model=64,
        num_heads=4,
        d_ff=256,
        max_len=512,
        dropout_rate=0.0,
        **_T5,
    ),
    # Raffel et al. 2020 (T5 v1.0): small 60.5M and base 223M with the 32128-token vocabulary.
    "t5_small": Seq2SeqConfig(
        vocab_size=32128, num_layers=6, d_model=512, num_heads=8, d_ff=2048, max_len=512, **_T5
    ),
    "t5_base": Seq2SeqConfig(
        vocab_size=32128, num_layers=12, d_model=768, num_heads=12, d_ff=3072, max_len=512, **_T5
    ),
}
