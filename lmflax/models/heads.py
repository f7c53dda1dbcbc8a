"""Task heads for fine-tuning: sequence classification, token classification (tagging) and
extractive question answering (start/end span logits), plus the models that put them on a
backbone.

The heads read hidden states, so they sit on any lmflax encoder or decoder:

- `ClassificationHead`: [..., D] -> [..., C] (dropout, then a dense layer). On a pooled vector
  [B, D] it classifies sequences; on hidden states [B, T, D] it tags tokens.
- `SpanHead`: [B, T, D] -> start and end logits, [B, T] each.
- `pool`: [B, T, D] -> [B, D] by the first token ([CLS]), the last non-padding token (what a
  causal decoder has read the whole input at) or the mean over real tokens.

Parameter names follow Hugging Face's `*ForSequenceClassification` / `*ForTokenClassification` /
`*ForQuestionAnswering` (`bert`, `classifier`, `qa_outputs`; GPT's `score` has no bias), so a
checkpoint importer maps them one to one.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.models.bert import BertConfig, RobertaConfig, encoder
from lmflax.models.gpt import GPT, GPTConfig
from lmflax.nn import Linear
from lmflax.nn.util import DType, as_dtype, constrain, logical_param

POOLINGS = ("first", "last", "mean")


def pool(hidden: jax.Array, mask: jax.Array | None, how: str) -> jax.Array:
    """hidden [B, T, D], mask [B, T] (1 = real token) -> [B, D].

    'first': the first token (BERT's [CLS]). 'last': the last real token, i.e. the highest index
    where mask is 1, so right padding is skipped (a causal decoder has seen the whole input
    there). 'mean': the average over real tokens.
    """
    if how == "first":
        return hidden[:, 0]
    B, T = hidden.shape[:2]
    if mask is None:
        mask = jnp.ones((B, T), jnp.int32)
    if how == "last":
        # argmax of index·mask is the last real position (0 for an all-padding row).
        last = jnp.argmax(jnp.arange(T)[None, :] * (mask > 0), axis=-1)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    if how == "mean":
        w = (mask > 0).astype(jnp.float32)
        total = jnp.einsum("BTD,BT->BD", hidden.astype(jnp.float32), w)
        return (total / jnp.maximum(w.sum(-1, keepdims=True), 1.0)).astype(hidden.dtype)
    raise ValueError(f"unknown pooling {how!r}; accepted: {POOLINGS}")


class ClassificationHead(nn.Module):
    """x [..., D] -> logits [..., C]: dropout, then kernel [D, C] ('embed', 'labels') + bias."""

    num_labels: int
    dropout_rate: float = 0.0
    use_bias: bool = True
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        dtype = as_dtype(self.dtype)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic).astype(dtype)
        kernel = logical_param(
            self,
            "kernel",
            nn.initializers.normal(self.init_std),
            (x.shape[-1], self.num_labels),
            ("embed", "labels"),
            self.param_dtype,
        )
        y = jnp.einsum("...D,DC->...C", x, kernel.astype(dtype))
        if self.use_bias:
            bias = logical_param(
                self,
                "bias",
                nn.initializers.zeros,
                (self.num_labels,),
                ("labels",),
                self.param_dtype,
            )
            y = y + bias.astype(dtype)
        return y


class SpanLogits(NamedTuple):
    start_logits: jax.Array  # [B, T]
    end_logits: jax.Array  # [B, T]


class SpanHead(nn.Module):
    """hidden [B, T, D] -> SpanLogits: kernel [D, 2] ('embed', 'span') + bias, split in two."""

    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> SpanLogits:
        dtype = as_dtype(self.dtype)
        kernel = logical_param(
            self,
            "kernel",
            nn.initializers.normal(self.init_std),
            (hidden.shape[-1], 2),
            ("embed", "span"),
            self.param_dtype,
        )
        bias = logical_param(self, "bias", nn.initializers.zeros, (2,), ("span",), self.param_dtype)
        y = jnp.einsum("BTD,DS->BTS", hidden.astype(dtype), kernel.astype(dtype)) + bias.astype(
            dtype
        )
        return SpanLogits(y[..., 0], y[..., 1])


def _head_kwargs(c: BertConfig | GPTConfig) -> dict:
    return dict(init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype)


class BertForSequenceClassification(nn.Module):
    """input_ids [B, T] (+ attention_mask, token_type_ids [B, T]) -> logits [B, C].

    pooling 'pooled' classifies BERT's pooler output tanh(W h[CLS] + b) (as BERT was
    pre-trained to, and as Hugging Face's `BertForSequenceClassification` does: lmflax.hf loads
    and exports those checkpoints through this module); 'first' the raw [CLS] state; 'mean' the
    mean over real tokens. classifier_dropout: the dropout before the classifier; None =
    config.dropout_rate (as transformers does when its `classifier_dropout` is null).
    Parameters: {"bert": BertModel's, "classifier": {"kernel": [D, C], "bias": [C]}}.
    """

    config: BertConfig
    num_labels: int
    pooling: str = "pooled"
    classifier_dropout: float | None = None

    def setup(self) -> None:
        c = self.config
        if self.pooling not in ("pooled", *POOLINGS):
            raise ValueError(
                f"unknown pooling {self.pooling!r} for BERT; accepted: pooled, {', '.join(POOLINGS)}"
            )
        if self.num_labels <= 0:
            raise ValueError(f"num_labels must be > 0, got {self.num_labels}")
        self.bert = encoder(dataclasses.replace(c, add_pooler=self.pooling == "pooled"))
        rate = c.dropout_rate if self.classifier_dropout is None else self.classifier_dropout
        self.classifier = ClassificationHead(self.num_labels, dropout_rate=rate, **_head_kwargs(c))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        deterministic: bool,
    ) -> jax.Array:
        out = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            positions=positions,
            deterministic=deterministic,
        )
        if self.pooling == "pooled":
            pooled = out.pooler_output
        else:
            pooled = pool(out.last_hidden_state, attention_mask, self.pooling)
        return self.classifier(pooled, deterministic=deterministic)


class BertForTokenClassification(nn.Module):
    """input_ids [B, T] (+ attention_mask, token_type_ids) -> per-token logits [B, T, C].

    With a RobertaConfig this is RoBERTa's token classifier (the backbone is `encoder(config)`).
    Parameters: {"bert": the encoder's (no pooler), "classifier": {"kernel": [D, C], "bias"}}.
    """

    config: BertConfig
    num_labels: int

    def setup(self) -> None:
        c = self.config
        self.bert = encoder(dataclasses.replace(c, add_pooler=False))
        self.classifier = ClassificationHead(
            self.num_labels, dropout_rate=c.dropout_rate, **_head_kwargs(c)
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool,
    ) -> jax.Array:
        out = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        logits = self.classifier(out.last_hidden_state, deterministic=deterministic)
        return constrain(logits, ("batch", "length", "labels"))


class BertForQuestionAnswering(nn.Module):
    """input_ids [B, T] (question [SEP] context, token_type_ids 0 then 1) -> SpanLogits.

    With a RobertaConfig this is RoBERTa's span extractor (the backbone is `encoder(config)`).
    Parameters: {"bert": the encoder's (no pooler), "qa_outputs": {"kernel": [D, 2], "bias"}}.
    """

    config: BertConfig

    def setup(self) -> None:
        c = self.config
        self.bert = encoder(dataclasses.replace(c, add_pooler=False))
        self.qa_outputs = SpanHead(**_head_kwargs(c))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool,
    ) -> SpanLogits:
        out = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        return self.qa_outputs(out.last_hidden_state)


class RobertaClassificationHead(nn.Module):
    """RoBERTa's sequence head on a pooled x [B, D] -> logits [B, C]: dropout, dense [D, D],
    tanh, dropout, out_proj [D, C] (Hugging Face's RobertaClassificationHead)."""

    num_labels: int
    dropout_rate: float = 0.0
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        common = dict(init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = jnp.tanh(Linear((x.shape[-1],), ("embed", "mlp"), name="dense", **common)(x))
        return ClassificationHead(
            self.num_labels, dropout_rate=self.dropout_rate, name="out_proj", **common
        )(x, deterministic=deterministic)


class RobertaForSequenceClassification(nn.Module):
    """input_ids [B, T] (+ attention_mask [B, T]) -> logits [B, C], RoBERTa's way: no pooler;
    `RobertaClassificationHead` on the first token's state (<s>), or with pooling 'mean' on the
    mean over real tokens. classifier_dropout: None = config.dropout_rate.
    Parameters: {"bert": RobertaModel's (no pooler), "classifier": {"dense", "out_proj"}}.
    """

    config: RobertaConfig
    num_labels: int
    pooling: str = "first"
    classifier_dropout: float | None = None

    def setup(self) -> None:
        c = self.config
        if self.pooling not in ("first", "mean"):
            raise ValueError(
                f"unknown pooling {self.pooling!r} for RoBERTa (it has no pooler); accepted: "
                "first, mean"
            )
        if self.num_labels <= 0:
            raise ValueError(f"num_labels must be > 0, got {self.num_labels}")
        self.bert = encoder(dataclasses.replace(c, add_pooler=False))
        rate = c.dropout_rate if self.classifier_dropout is None else self.classifier_dropout
        self.classifier = RobertaClassificationHead(
            self.num_labels, dropout_rate=rate, **_head_kwargs(c)
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        deterministic: bool,
    ) -> jax.Array:
        out = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            positions=positions,
            deterministic=deterministic,
        )
        pooled = pool(out.last_hidden_state, attention_mask, self.pooling)
        return self.classifier(pooled, deterministic=deterministic)


class GPTForSequenceClassification(nn.Module):
    """A causal decoder classifying at its last real token: input_ids [B, T], attention_mask
    [B, T] (1 = real, right padding) -> logits [B, C].

    pooling 'last' (the default, GPT-2's choice) or 'mean'; 'first' would see one token only.
    """

    config: GPTConfig
    num_labels: int
    pooling: str = "last"

    def setup(self) -> None:
        c = self.config
        if self.pooling not in ("last", "mean"):
            raise ValueError(
                f"pooling {self.pooling!r} on a causal decoder: the first token sees nothing "
                "after it; accepted: last, mean"
            )
        self.gpt = GPT(c)
        self.score = ClassificationHead(
            self.num_labels, dropout_rate=c.dropout_rate, use_bias=False, **_head_kwargs(c)
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool,
    ) -> jax.Array:
        del token_type_ids  # a decoder has no segment embeddings
        # Padding is segment 0: real tokens never attend to it.
        segments = None if attention_mask is None else (attention_mask > 0).astype(jnp.int32)
        hidden = self.gpt(
            input_ids, segment_ids=segments, deterministic=deterministic, return_hidden=True
        )
        return self.score(pool(hidden, attention_mask, self.pooling), deterministic=deterministic)
