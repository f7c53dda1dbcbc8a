"""Token classification with BIO tags (named entities: conll2003) on a BERT encoder.

Each word's tag is learned and predicted at its first WordPiece sub-token; evaluation maps the
predictions back to one tag per word and scores whole entities (type and both boundaries).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmflax.config import Config
from lmflax.core.losses import Metric, cross_entropy
from lmflax.data import tasks as data_tasks
from lmflax.evaluate import metrics
from lmflax.models import BertForTokenClassification
from lmflax.tasks.finetune import Collector, FinetuneTask, Row, ratio


def word_tags(
    token_predictions: np.ndarray, word_starts: np.ndarray, names: Sequence[str]
) -> list[str]:
    """Per-token tag ids [L] -> one tag name per word: the prediction at the word's first
    sub-token, 'O' for a word that has none in the row (cut off, or no tokens at all)."""
    return [names[int(token_predictions[p])] if p >= 0 else "O" for p in word_starts]


class _EntityCollector(Collector):
    def __init__(self, names: Sequence[str]):
        self.names = names
        self.entities = np.zeros(3, np.int64)
        self.sentences = 0

    def add(self, rows: Sequence[Row], predictions: dict[str, np.ndarray]) -> None:
        gold, pred = [], []
        for row, tags in zip(rows, predictions["tags"]):
            gold.append([self.names[t] for t in row["tags"]])
            pred.append(word_tags(tags, row["word_starts"], self.names))
        self.entities += metrics.entity_counts(gold, pred)
        self.sentences += len(rows)

    def counts(self) -> dict[str, np.ndarray]:
        return {"entities": self.entities, "sentences": np.asarray(self.sentences)}


class TokenClassification(FinetuneTask):
    """BIO tagging: cross-entropy at the first sub-token of every word."""

    name = "tagging"
    batch_keys: ClassVar[tuple[str, ...]] = ("inputs", "attention_mask", "labels", "weights")
    row_shapes: ClassVar[dict[str, tuple[str, ...]]] = {
        "inputs": ("L",),
        "attention_mask": ("L",),
        "labels": ("L",),
        "weights": ("L",),
    }

    def config_errors(self, cfg: Config) -> list[str]:
        errs = self.encoder_only(cfg)
        if cfg.task.num_labels < 1:
            errs.append(f"task.num_labels must be >= 1, got {cfg.task.num_labels}")
        return errs

    @property
    def label_names(self) -> tuple[str, ...]:
        names = super().label_names
        for n in names:  # entity scoring reads the tags' BIO structure
            if n != "O" and not (len(n) > 2 and n[0] in "BI" and n[1] == "-"):
                raise data_tasks.DataError(
                    f"dataset {self.cfg.data.dataset!r} tag {n!r} is not BIO (O, B-TYPE, I-TYPE)"
                )
        return names

    def build_model(self) -> nn.Module:
        return BertForTokenClassification(self.cfg.model, self.cfg.task.num_labels)

    def featurize(self, index: int, record: dict[str, Any], *, train: bool) -> Row:
        words, tags = data_tasks.words_and_tags(record, self.spec)
        if any(not 0 <= t < self.num_labels for t in tags):
            raise data_tasks.DataError(
                f"record {index} of {self.cfg.data.dataset!r} has tags {sorted(set(tags))}; the "
                f"head has {self.num_labels}"
            )
        row = data_tasks.tagging_features(self.tokenizer, words, tags, self.cfg.data.seq_len)
        if not train:
            row["tags"] = tags
        return row

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
        return m, {"tags": jnp.argmax(logits, axis=-1).astype(jnp.int32)}

    def collector(self) -> Collector:
        return _EntityCollector(self.label_names)

    def finish(self, sums: dict[str, Any], counts: dict[str, np.ndarray]) -> dict[str, float]:
        return {
            "loss": ratio(sums["loss"]),
            "tag_accuracy": ratio(sums["accuracy"]),
            **metrics.entity_metrics(counts["entities"]),
            "examples": float(counts["sentences"]),
        }
