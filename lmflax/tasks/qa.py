"""Extractive question answering (SQuAD v1.1) on a BERT encoder.

Contexts longer than a row are split into overlapping windows. Training points each window at
the answer's first and last token, or at [CLS] when the window does not hold the whole answer.
Evaluation picks the best-scoring valid span (start <= end, both in the context, at most
task.max_answer_len tokens) in each window on device, keeps the best window per question on the
host, and cuts the answer out of the original context by character offsets, so the text scored
is the context's own text, not a detokenization.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmflax.config import Config
from lmflax.core.losses import Metric
from lmflax.data import tasks as data_tasks
from lmflax.evaluate import metrics
from lmflax.models import BertForQuestionAnswering
from lmflax.tasks.finetune import Collector, FinetuneTask, Row, ratio

_NEG = -1e9  # logits of padding positions: far below any real one, finite in float32


def best_spans(
    start_logits: jax.Array,
    end_logits: jax.Array,
    context_mask: jax.Array,
    max_answer_len: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best span of each row: start_logits, end_logits, context_mask [B, T] ->
    (start [B], end [B], score [B]) maximising start_logit + end_logit over start <= end <
    start + max_answer_len with both ends on context tokens. Ties go to the earliest start, then
    the earliest end. A row without context tokens scores -inf."""
    B, T = start_logits.shape
    i = jnp.arange(T)[:, None]
    j = jnp.arange(T)[None, :]
    allowed = (j >= i) & (j - i < max_answer_len)
    ctx = context_mask > 0
    valid = allowed[None] & ctx[:, :, None] & ctx[:, None, :]
    score = (
        start_logits.astype(jnp.float32)[:, :, None] + end_logits.astype(jnp.float32)[:, None, :]
    )
    score = jnp.where(valid, score, -jnp.inf).reshape(B, T * T)
    flat = jnp.argmax(score, axis=-1)  # the first maximum in row-major order
    return (flat // T).astype(jnp.int32), (flat % T).astype(jnp.int32), jnp.max(score, axis=-1)


class _AnswerCollector(Collector):
    """Best window per question -> answer text -> EM and F1 sums."""

    def __init__(self) -> None:
        self.best: dict[int, tuple[float, str]] = {}
        self.examples: dict[int, Row] = {}

    def add(self, rows: Sequence[Row], predictions: dict[str, np.ndarray]) -> None:
        for k, row in enumerate(rows):
            example = row["example"]
            self.examples.setdefault(example["index"], example)
            score = float(predictions["score"][k])
            if not np.isfinite(score):
                continue
            s, e = int(predictions["start"][k]), int(predictions["end"][k])
            text = example["context"][int(row["offsets"][s][0]) : int(row["offsets"][e][1])]
            old = self.best.get(example["index"])
            if old is None or score > old[0]:  # ties keep the earlier window
                self.best[example["index"]] = (score, text)

    def counts(self) -> dict[str, np.ndarray]:
        order = sorted(self.examples)
        predictions = [self.best.get(i, (0.0, ""))[1] for i in order]
        answers = [self.examples[i]["answers"] for i in order]
        return {"squad": metrics.squad_counts(predictions, answers)}


class QuestionAnswering(FinetuneTask):
    """Start/end cross-entropy (the mean of the two) per window."""

    name = "qa"
    fan_out = True
    batch_keys: ClassVar[tuple[str, ...]] = (
        "inputs",
        "attention_mask",
        "token_type_ids",
        "context_mask",
        "start_positions",
        "end_positions",
        "weights",
    )
    row_shapes: ClassVar[dict[str, tuple[str, ...]]] = {
        "inputs": ("L",),
        "attention_mask": ("L",),
        "token_type_ids": ("L",),
        "context_mask": ("L",),
        "start_positions": (),
        "end_positions": (),
        "weights": (),
    }

    def config_errors(self, cfg: Config) -> list[str]:
        errs = self.encoder_only(cfg)
        k, L = cfg.task, cfg.data.seq_len
        for name in ("max_query_len", "doc_stride", "max_answer_len"):
            if getattr(k, name) <= 0:
                errs.append(f"task.{name} must be > 0, got {getattr(k, name)}")
        room = L - k.max_query_len - 3
        if room <= 0:
            errs.append(
                f"data.seq_len ({L}) must exceed task.max_query_len ({k.max_query_len}) + 3 "
                "([CLS] question [SEP] context [SEP])"
            )
        elif k.doc_stride > room:
            errs.append(
                f"task.doc_stride ({k.doc_stride}) is larger than the context room of a row "
                f"(data.seq_len - task.max_query_len - 3 = {room}); windows would skip text"
            )
        return errs

    @property
    def label_names(self) -> tuple[str, ...]:
        return ()  # spans, not classes

    def build_model(self) -> nn.Module:
        return BertForQuestionAnswering(self.cfg.model)

    def featurize(self, index: int, record: dict[str, Any], *, train: bool) -> list[Row]:
        context = data_tasks.as_str(data_tasks.field_of(record, self.spec.text_key, index))
        question = data_tasks.as_str(data_tasks.field_of(record, self.spec.question_key, index))
        texts, starts = data_tasks.answers_of(record, self.spec)
        k = self.cfg.task
        windows = data_tasks.qa_windows(
            self.tokenizer,
            question,
            context,
            data_tasks.answer_span(context, texts, starts),
            seq_len=self.cfg.data.seq_len,
            max_query_len=k.max_query_len,
            doc_stride=k.doc_stride,
        )
        if train:
            for w in windows:
                del w["offsets"]
        else:
            example = {"index": index, "context": context, "answers": texts or [""]}
            for w in windows:
                w["example"] = example
        return windows

    def _logits(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None, deterministic: bool
    ) -> tuple[jax.Array, jax.Array]:
        out = self.apply(params, batch, rng, deterministic)
        real = batch["attention_mask"] > 0
        start = jnp.where(real, out.start_logits.astype(jnp.float32), _NEG)
        end = jnp.where(real, out.end_logits.astype(jnp.float32), _NEG)
        return start, end

    def _loss(
        self, start: jax.Array, end: jax.Array, batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, Metric]]:
        w = batch["weights"].astype(jnp.float32)

        def nll(logits: jax.Array, target: jax.Array) -> jax.Array:
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.take_along_axis(logp, target[:, None].astype(jnp.int32), axis=-1)[:, 0]

        per_row = 0.5 * (nll(start, batch["start_positions"]) + nll(end, batch["end_positions"]))
        loss_sum = jnp.sum(per_row * w)
        hit = (jnp.argmax(start, -1) == batch["start_positions"]) & (
            jnp.argmax(end, -1) == batch["end_positions"]
        )
        count = jnp.sum(w)
        return loss_sum, {"loss": (loss_sum, count), "span_accuracy": (jnp.sum(hit * w), count)}

    def loss(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, dict[str, Metric]]:
        start, end = self._logits(params, batch, rng, deterministic)
        return self._loss(start, end, batch)

    def eval_outputs(
        self, params: Any, batch: dict[str, jax.Array]
    ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        start, end = self._logits(params, batch, None, True)
        _, m = self._loss(start, end, batch)
        s, e, score = best_spans(start, end, batch["context_mask"], self.cfg.task.max_answer_len)
        return m, {"start": s, "end": e, "score": score}

    def collector(self) -> Collector:
        return _AnswerCollector()

    def finish(self, sums: dict[str, Any], counts: dict[str, np.ndarray]) -> dict[str, float]:
        return {
            "loss": ratio(sums["loss"]),
            "span_accuracy": ratio(sums["span_accuracy"]),
            **metrics.squad_metrics(counts["squad"]),
            "examples": float(counts["squad"][2]),
        }
