"""What fine-tuning tasks share: a labelled TFDS dataset checked against the head, a tokenizer,
training batches, and an exact evaluation protocol over a whole split.

Evaluation (driven by `lmflax.train.evaluation`) runs in three parts so that every number is
exact across batches and hosts:
1. `eval_features`: this process's rows of the split, featurized once (and cached);
2. `eval_outputs(params, batch)` (pure, jitted): metric sums of the global batch, replicated,
   plus per-row predictions, sharded like the batch;
3. a `Collector` per evaluation turns this process's predictions into counts that need text
   (entities, answers); the trainer sums them over processes and `finish` turns all the sums
   into metrics.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import numpy as np

from lmflax.config import Config, ConfigError
from lmflax.data import tasks as data_tasks
from lmflax.data.tokenizers import Tokenizer
from lmflax.models import BertConfig
from lmflax.tasks.base import Task

Row = dict[str, Any]


class Collector:
    """Host-side counts from predictions; the base class counts nothing."""

    def add(self, rows: Sequence[Row], predictions: dict[str, np.ndarray]) -> None:
        """rows: this process's feature rows of one batch; predictions: their model outputs
        (the first len(rows) entries of each array)."""
        del rows, predictions

    def counts(self) -> dict[str, np.ndarray]:
        """Additive counts (summed over processes before `FinetuneTask.finish`)."""
        return {}


class FinetuneTask(Task):
    """A supervised task on a labelled dataset named in `lmflax.data.tasks.DATASETS`.

    Subclasses set `name` (a DatasetSpec kind), `batch_keys` (what the model and loss read) and
    `row_shapes` (trailing shape of each key: () per example, ('L',) per token), and implement
    `featurize`, `loss`, `eval_outputs` and `finish`.
    """

    default_tokenizer = "wordpiece"
    exact_eval = True
    batch_keys: ClassVar[tuple[str, ...]]
    row_shapes: ClassVar[dict[str, tuple[str, ...]]]

    def __init__(self, cfg: Config):
        self.spec = data_tasks.dataset_spec(
            self.name, cfg.data.dataset, text_key=cfg.data.text_key, label_key=cfg.data.label_key
        )
        errs = self.config_errors(cfg)
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
        super().__init__(cfg)
        self._labels: tuple[str, ...] | None = None
        self._eval_cache: dict[tuple[Any, ...], list[Row]] = {}

    def config_errors(self, cfg: Config) -> list[str]:
        """Problems of the task section for this task (empty = fine)."""
        del cfg
        return []

    def encoder_only(self, cfg: Config) -> list[str]:
        if isinstance(cfg.model, BertConfig):
            return []
        return [
            f"task {self.name!r} needs a BERT encoder (model family 'bert'); model family is "
            f"{cfg.model.family!r}"
        ]

    # ---- data ---------------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        return self.cfg.task.num_labels

    @property
    def label_names(self) -> tuple[str, ...]:
        """The dataset's class names, checked against the head's size on first use."""
        if self._labels is None:
            d = self.cfg.data
            names = data_tasks.label_names(d.dataset, self.spec, d.data_dir)
            data_tasks.check_num_labels(d.dataset, names, self.num_labels)
            self._labels = names
        return self._labels

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            _ = self.label_names  # a head that cannot fit the data stops before any work
            tok = data_tasks.load_task_tokenizer(self.cfg, self.spec)
            pad = getattr(self.cfg.model, "pad_token_id", None)
            if pad is not None and tok.pad_id != pad:
                # RoBERTa counts positions over the tokens that are not pad_token_id.
                raise ConfigError(
                    f"invalid config:\n  model.pad_token_id is {pad}, but the tokenizer "
                    f"({self.cfg.data.tokenizer!r}) pads with id {tok.pad_id}; set "
                    f"model.pad_token_id={tok.pad_id} or use the checkpoint's tokenizer"
                )
            self._tokenizer = tok
        return self._tokenizer

    @abc.abstractmethod
    def featurize(self, index: int, record: dict[str, Any], *, train: bool) -> Row | list[Row]:
        """One record -> a row (or rows: QA windows); eval rows also carry what the collector
        maps predictions back with."""

    fan_out: ClassVar[bool] = False

    def dataset(
        self,
        split: str,
        *,
        seed: int,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Any:
        """Batches of featurized examples (a record may give several rows: `fan_out`)."""
        _ = self.tokenizer  # checks the labels, trains or loads the tokenizer
        return data_tasks.train_batches(
            self.cfg,
            split,
            functools.partial(self.featurize, train=True),
            self.batch_keys,
            seed=seed,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            fan_out=self.fan_out,
        )

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        L = self.cfg.data.seq_len
        out = {}
        for key in self.batch_keys:
            shape = tuple(L if d == "L" else d for d in self.row_shapes[key])
            dtype = np.float32 if key == "weights" else np.int32
            out[key] = np.ones((batch_size, *shape), dtype)
        return out

    def token_types(self, batch: dict[str, Any]) -> Any:
        """The batch's token_type_ids if the model has segment embeddings for them: a RoBERTa
        (one token type, as its tokenizers give none) or DistilBERT (none) reads all zeros, not
        ids its table lacks."""
        if getattr(self.cfg.model, "type_vocab_size", 0) < 2:
            return None
        return batch.get("token_type_ids")

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        return self.model.init(
            rng,
            batch["inputs"],
            batch["attention_mask"],
            self.token_types(batch),
            deterministic=True,
        )

    def apply(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None, deterministic: bool
    ) -> Any:
        return self.model.apply(
            {"params": params},
            batch["inputs"],
            batch["attention_mask"],
            self.token_types(batch),
            deterministic=deterministic,
            rngs=None if rng is None else {"dropout": rng},
        )

    # ---- evaluation ---------------------------------------------------------------------

    def eval_features(
        self,
        split: str,
        *,
        process_index: int = 0,
        process_count: int = 1,
        limit: int | None = None,
    ) -> list[Row]:
        """This process's eval rows of `split` in order, at least `limit` of them (all rows of a
        record are kept together) or all; cached, so periodic evaluation featurizes once."""
        key = (split, process_index, process_count, limit)
        if key not in self._eval_cache:
            _ = self.tokenizer
            rows: list[Row] = []
            for out in data_tasks.eval_records(
                self.cfg,
                split,
                functools.partial(self.featurize, train=False),
                process_index=process_index,
                process_count=process_count,
            ):
                rows.extend(out if isinstance(out, list) else [out])
                if limit is not None and len(rows) >= limit:
                    break
            self._eval_cache[key] = rows
        return self._eval_cache[key]

    def collate(self, rows: Sequence[Row], batch_size: int) -> dict[str, np.ndarray]:
        """Rows -> a batch of batch_keys, padded to batch_size with all-zero rows (weight 0)."""
        if len(rows) > batch_size:
            raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
        dummy = self.dummy_batch(batch_size)
        out = {}
        for key, pad in dummy.items():
            arr = np.zeros_like(pad)
            if rows:
                arr[: len(rows)] = np.stack([r[key] for r in rows])
            out[key] = arr
        return out

    @abc.abstractmethod
    def eval_outputs(
        self, params: Any, batch: dict[str, jax.Array]
    ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """(metric sums over the batch, per-row predictions [B, ...]); pure, jit-able."""

    def collector(self) -> Collector:
        return Collector()

    @abc.abstractmethod
    def finish(self, sums: dict[str, Any], counts: dict[str, np.ndarray]) -> dict[str, float]:
        """Aggregated device sums and host counts -> metrics."""


def ratio(pair: tuple[Any, Any]) -> float:
    """A (sum, count) pair's value (NaN for no count)."""
    total, count = (float(x) for x in pair)
    return total / count if count else float("nan")
