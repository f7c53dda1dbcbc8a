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
    positions, two token types, a pooler over [CLS]. type_vocab_size=0: no token-type
    embeddings (DistilBERT's layout; token_type_ids are then not read)."""

    family = "bert"
    activation: str = "gelu"
    norm_position: str = "post"
    norm_eps: float = 1e-12
    type_vocab_size: int = 2
    add_pooler: bool = True
    vocab_size: int = 30522

    def validate(self) -> list[str]:
        errs = super().validate()
        if self.type_vocab_size < 0:
            errs.append(
                f"model.type_vocab_size must be >= 0 (0 = no token types), got "
                f"{self.type_vocab_size}"
            )
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
    token_type_ids are ignored when config.type_vocab_size is 0 (no type embeddings).
    positions [B, T] or [T]: indices into the position table (default 0..T-1).
    """

    config: BertConfig

    def setup(self) -> None:
        c = self.config
        common = dict(init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype)
        self.token_embed = Embed(c.vocab_size, c.d_model, **common)
        self.position_embed = LearnedPositions(c.max_len, c.d_model, **common)
        if c.type_vocab_size > 0:
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
        x = self.token_embed(input_ids) + self.position_embed(positions)
        if self.config.type_vocab_size > 0:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
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


@register_model_config
@dataclasses.dataclass(frozen=True, kw_only=True)
class RobertaConfig(BertConfig):
    """A RoBERTa (or XLM-RoBERTa) encoder: BERT's stack, one token type, and positions counted
    over the non-padding tokens only, starting at pad_token_id + 1 (padding tokens take position
    pad_token_id), as fairseq and Hugging Face's RobertaModel compute them from input_ids.

    max_len is the position table's size (514 for roberta-base), so rows hold at most
    max_len - pad_token_id - 1 tokens.
    """

    family = "roberta"
    pad_token_id: int = 1
    type_vocab_size: int = 1
    vocab_size: int = 50265
    max_len: int = 514

    def validate(self) -> list[str]:
        errs = super().validate()
        if not 0 <= self.pad_token_id < self.vocab_size:
            errs.append(
                f"model.pad_token_id must be in [0, vocab_size={self.vocab_size}), got "
                f"{self.pad_token_id}"
            )
        if self.max_len <= self.pad_token_id + 1:
            errs.append(
                f"model.max_len ({self.max_len}) leaves no positions after the "
                f"pad_token_id + 1 = {self.pad_token_id + 1} that RoBERTa's positions start at"
            )
        return errs

    def check_inputs(self, seq_len: int) -> list[str]:
        room = self.max_len - self.pad_token_id - 1
        if seq_len > room:
            return [
                f"data.seq_len ({seq_len}) is longer than the RoBERTa positions hold "
                f"(model.max_len={self.max_len} - pad_token_id {self.pad_token_id} - 1 = {room})"
            ]
        return []


def roberta_positions(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """input_ids [B, T] -> positions [B, T]: pad_token_id + (1, 2, ...) over the tokens that are
    not pad_token_id, pad_token_id at those that are (fairseq's `make_positions`)."""
    real = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + pad_token_id


class RobertaModel(BertModel):
    """BertModel with RoBERTa's positions (`roberta_positions` of input_ids unless `positions`
    is given). input_ids [B, T] (+ attention_mask [B, T]) -> BertOutput; the parameters are
    BertModel's."""

    config: RobertaConfig

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
            positions = roberta_positions(input_ids, self.config.pad_token_id)
        return super().__call__(
            input_ids,
            attention_mask,
            token_type_ids,
            positions=positions,
            deterministic=deterministic,
        )


def encoder(config: BertConfig) -> BertModel:
    """The encoder module of a BERT-family config: RobertaModel for a RobertaConfig, else
    BertModel. The task heads put it under the name `bert` either way."""
    return RobertaModel(config) if isinstance(config, RobertaConfig) else BertModel(config)


class BertForMaskedLM(nn.Module):
    """BERT with its MLM head: dense + gelu + LayerNorm, then the tied decoder plus a bias.

    input_ids [B, T] -> logits [B, T, V].
    """

    config: BertConfig

    def setup(self) -> None:
        c = self.config
        self.bert = encoder(dataclasses.replace(c, add_pooler=False))
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
    "roberta_tiny": RobertaConfig(
        vocab_size=2048,
        num_layers=2,
        d_model=128,
        num_heads=2,
        d_ff=512,
        max_len=258,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    ),
    "roberta_base": RobertaConfig(
        vocab_size=50265,
        num_layers=12,
        d_model=768,
        num_heads=12,
        d_ff=3072,
        max_len=514,
        norm_eps=1e-5,
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
