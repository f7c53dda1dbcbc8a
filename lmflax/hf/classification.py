"""BERT with a sequence-classification head, laid out as Hugging Face's
`BertForSequenceClassification`: pooled [CLS] (tanh dense) -> dropout -> linear -> logits.

lmflax.hf needs it to load and export those checkpoints with parity. Parameters:
{"bert": BertModel's (with its pooler), "classifier": {"kernel": [D, C], "bias": [C]}}.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from lmflax.models.bert import BertConfig, BertModel
from lmflax.nn import Linear


class BertForSequenceClassification(nn.Module):
    """input_ids [B, T] (+ attention_mask, token_type_ids [B, T]) -> logits [B, num_labels].

    classifier_dropout: the dropout before the classifier; None = config.dropout_rate (as
    transformers does when its `classifier_dropout` is null).
    """

    config: BertConfig
    num_labels: int
    classifier_dropout: float | None = None

    def setup(self) -> None:
        c = self.config
        if self.num_labels <= 0:
            raise ValueError(f"num_labels must be > 0, got {self.num_labels}")
        self.bert = BertModel(dataclasses.replace(c, add_pooler=True))
        rate = c.dropout_rate if self.classifier_dropout is None else self.classifier_dropout
        self.dropout = nn.Dropout(rate)
        # The label axis is tiny: it stays unsharded (logical name None).
        self.classifier = Linear(
            (self.num_labels,),
            ("embed", None),
            init_std=c.init_std,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
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
        pooled = self.dropout(out.pooler_output, deterministic=deterministic)
        return self.classifier(pooled)
