"""BERT-style encoder: token + position + token-type embeddings, post-norm stack, pooler, MLM head."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.models.config import ModelConfig, register_model_config
from lmflax.nn import Embed, Encoder, LayerNorm, LearnedPositions, Linear, SegmentIds, activation_fn
from lmflax.nn.util import as_dtype, constrain


@register_model_config
@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig(ModelConfig):
    """A BERT encoder. Defaults are BERT's: post-norm, exact gelu, LayerNorm eps 1e-12, learned
    positions, two token types, a pooler over [CLS]."""

    family = "bert"
    activation: str = "gelu"
    norm_position: str = "post"
    norm_eps: float = 1e-12
    type_vocab_size: int = 2
    add_pooler: bool = True
    vocab_size: int = 30522

    def validate(self) -> list[str]:
        errs = super().validate()
        if self.type_vocab_size <= 0:
            errs.append(f"model.type_vocab_size must be > 0, got {self.type_vocab_size}")
        if self.position != "learned":
            errs.append(f"BERT uses learned positions; model.position is {self.position!r}")
        if self.sliding_window is not None:
            errs.append(
                f"model.sliding_window={self.sliding_window} is not supported for BERT: a "
                "sliding window limits causal (decoder) self-attention only"
            )
        if not self.tie_embeddings:
            errs.append(
                "model.tie_embeddings=False is not supported for BERT: its MLM decoder is the "
                "token embedding matrix (as in BERT and Hugging Face's BertForMaskedLM)"
            )
        return errs


class BertOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, T, D]
    pooler_output: jax.Array | None  # [B, D]: tanh(W h[CLS] + b), None without a pooler


class BertModel(nn.Module):
    """input_ids [B, T] (+ attention_mask, token_type_ids [B, T]) -> BertOutput.

    attention_mask: 1 for real tokens, 0 for padding (padding keys are never attended to).
    """

    config: BertConfig

    def setup(self) -> None:
        c = self.config
        common = dict(init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype)
        self.token_embed = Embed(c.vocab_size, c.d_model, **common)
        self.position_embed = LearnedPositions(c.max_len, c.d_model, **common)
        self.type_embed = Embed(
            c.type_vocab_size, c.d_model, one_hot=True, axes=("token_types", "embed"), **common
        )
        self.embed_norm = LayerNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        self.embed_dropout = nn.Dropout(c.dropout_rate)
        self.encoder = Encoder(c)
        if c.add_pooler:
            self.pooler = Linear((c.d_model,), ("embed", "mlp"), **common)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        deterministic: bool,
    ) -> BertOutput:
        if positions is None:
            # The same positions in every row: one [1, T, D] lookup, whose gradient is a sum over
            # rows rather than a scatter-add with B-way collisions.
            positions = jnp.arange(input_ids.shape[1])
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.token_embed(input_ids) + self.position_embed(positions)
        x = x + self.type_embed(token_type_ids)
        x = self.embed_dropout(self.embed_norm(x), deterministic=deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        # Padding as segment ids (0 = padding key) so fused attention kernels can read it.
        mask = SegmentIds.padding(attention_mask) if attention_mask is not None else None
        hidden = self.encoder(x, mask=mask, deterministic=deterministic)
        pooled = jnp.tanh(self.pooler(hidden[:, 0])) if self.config.add_pooler else None
        return BertOutput(hidden, pooled)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., V] against the token embedding (the tied MLM decoder)."""
        return self.token_embed.attend(x)


class BertForMaskedLM(nn.Module):
    """BERT with its MLM head: dense + gelu + LayerNorm, then the tied decoder plus a bias.

    input_ids [B, T] -> logits [B, T, V].
    """

    config: BertConfig

    def setup(self) -> None:
        c = self.config
        self.bert = BertModel(dataclasses.replace(c, add_pooler=False))
        self.transform = Linear(
            (c.d_model,),
            ("embed", "mlp"),
            init_std=c.init_std,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
        )
        self.transform_norm = LayerNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        self.decoder_bias = self.param(
            "decoder_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
            (c.vocab_size,),
            as_dtype(c.param_dtype),
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        deterministic: bool,
        return_hidden: bool = False,
    ) -> jax.Array:
        out = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            positions=positions,
            deterministic=deterministic,
        )
        h = self.transform_norm(
            activation_fn(self.config.activation)(self.transform(out.last_hidden_state))
        )
        if return_hidden:
            return h
        return self.logits(h)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Transformed hidden [..., D] -> logits [..., V]."""
        dtype = as_dtype(self.config.dtype)
        logits = self.bert.attend(hidden) + self.decoder_bias.astype(dtype)
        return constrain(logits, ("batch", "length", "vocab"))


PRESETS = {
    "bert_tiny": BertConfig(
        vocab_size=2048,
        num_layers=2,
        d_model=128,
        num_heads=2,
        d_ff=512,
        max_len=256,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    ),
    "bert_base": BertConfig(
        vocab_size=30522,
        num_layers=12,
        d_model=768,
        num_heads=12,
        d_ff=3072,
        max_len=512,
    ),
    "bert_large": BertConfig(
        vocab_size=30522,
        num_layers=24,
        d_model=1024,
        num_heads=16,
        d_ff=4096,
        max_len=512,
    ),
}
