"""Sequence classification (sentiment: glue/sst2, imdb_reviews) on a BERT encoder or a GPT
decoder."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmflax.config import Config
from lmflax.core.losses import Metric, cross_entropy
from lmflax.data import tasks as data_tasks
from lmflax.evaluate import metrics
from lmflax.models import (
    BertConfig,
    BertForSequenceClassification,
    GPTConfig,
    GPTForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from lmflax.tasks.finetune import FinetuneTask, Row, ratio

# The first matching class decides (RobertaConfig is a BertConfig: it comes first).
_POOLING = {
    RobertaConfig: ("first", "mean"),
    BertConfig: ("pooled", "first", "mean"),
    GPTConfig: ("last", "mean"),
}


class SequenceClassification(FinetuneTask):
    """One label per text: cross-entropy on the head's logits. Evaluation reports accuracy and
    precision/recall/F1 (binary for two classes, macro and micro) from the confusion matrix."""

    name = "classification"
    batch_keys: ClassVar[tuple[str, ...]] = ("inputs", "attention_mask", "labels", "weights")
    row_shapes: ClassVar[dict[str, tuple[str, ...]]] = {
        "inputs": ("L",),
        "attention_mask": ("L",),
        "labels": (),
        "weights": (),
    }

    def config_errors(self, cfg: Config) -> list[str]:
        errs = []
        if cfg.task.num_labels < 2:
            errs.append(
                f"task.num_labels must be >= 2 for classification, got {cfg.task.num_labels}"
            )
        accepted = next((v for k, v in _POOLING.items() if isinstance(cfg.model, k)), None)
        if accepted is None:
            errs.append(
                "task 'classification' needs a 'bert', 'roberta' or 'gpt' model; family is "
                f"{cfg.model.family!r}"
            )
        elif cfg.task.pooling not in ("auto", *accepted):
            errs.append(
                f"task.pooling is {cfg.task.pooling!r}; accepted for model family "
                f"{cfg.model.family!r}: auto, {', '.join(accepted)}"
            )
        return errs

    def build_model(self) -> nn.Module:
        c, k = self.cfg.model, self.cfg.task
        if isinstance(c, GPTConfig):
            pooling = "last" if k.pooling == "auto" else k.pooling
            return GPTForSequenceClassification(c, k.num_labels, pooling)
        if isinstance(c, RobertaConfig):
            # RoBERTa's own head (dense + tanh + out_proj), as RobertaForSequenceClassification.
            pooling = "first" if k.pooling == "auto" else k.pooling
            return RobertaForSequenceClassification(c, k.num_labels, pooling)
        pooling = "pooled" if k.pooling == "auto" else k.pooling
        return BertForSequenceClassification(c, k.num_labels, pooling)

    def featurize(self, index: int, record: dict[str, Any], *, train: bool) -> Row:
        text = data_tasks.as_str(data_tasks.field_of(record, self.spec.text_key, index))
        label = int(np.asarray(data_tasks.field_of(record, self.spec.label_key, index)))
        if not 0 <= label < self.num_labels:
            raise data_tasks.DataError(
                f"record {index} of {self.cfg.data.dataset!r} has label {label}; the head has "
                f"{self.num_labels} classes (test splits without labels cannot be evaluated)"
            )
        return data_tasks.classification_features(
            self.tokenizer, text, label, self.cfg.data.seq_len
        )

    def loss(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, dict[str, Metric]]:
        logits = self.apply(params, batch, rng, deterministic)
        return cross_entropy(logits, batch["labels"], batch["weights"])

    def eval_outputs(
        self, params: Any, batch: dict[str, jax.Array]
    ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        logits = self.apply(params, batch, None, True)
        _, m = cross_entropy(logits, batch["labels"], batch["weights"])
        predictions = jnp.argmax(logits, axis=-1)
        confusion = metrics.confusion_matrix(
            batch["labels"], predictions, self.num_labels, batch["weights"]
        )
        return {"loss": m["loss"], "confusion": confusion}, {"labels": predictions}

    def finish(self, sums: dict[str, Any], counts: dict[str, np.ndarray]) -> dict[str, float]:
        cm = np.asarray(sums["confusion"])
        return {
            "loss": ratio(sums["loss"]),
            **metrics.classification_metrics(cm),
            "examples": float(cm.sum()),
        }
