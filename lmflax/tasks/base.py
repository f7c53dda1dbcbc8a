"""What a training task is: a model, batches, and a loss; the trainer needs nothing else."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import grain
import jax
import numpy as np

from lmflax.config import Config
from lmflax.core.losses import Metric
from lmflax.data import files
from lmflax.data.pipeline import tokenizer_for
from lmflax.data.tokenizers import Tokenizer


class Task(abc.ABC):
    """A training objective over a model family.

    Subclasses set `name` and `make_batches` and implement the abstract methods; register them in
    lmflax.tasks.TASKS. Batches are dicts of NumPy arrays with a leading global-batch axis.
    `exact_eval`: evaluation runs over the whole split once (`eval_features` / `eval_outputs`
    / `collector` / `finish`, see lmflax.tasks.finetune) instead of averaging `loss` metrics
    over train.eval_steps batches.
    """

    name: ClassVar[str]
    default_tokenizer: ClassVar[str] = "bpe"
    exact_eval: ClassVar[bool] = False
    #: The data pipeline: make_batches(cfg, vocabulary, split, *, seed, batch_size, process_index,
    #: process_count) -> per-process batches (a function of lmflax.data).
    make_batches: ClassVar[Callable[..., grain.IterDataset]]

    def __init__(self, cfg: Config):
        self.cfg = cfg
        files.use(cfg)  # a file dataset (data.dataset='csv:...') is read with this task's fields
        self._tokenizer: Tokenizer | None = None
        self.model = self.build_model()

    @property
    def tokenizer(self) -> Tokenizer:
        """Loaded (or trained and cached) on first use."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(
                self.cfg.data, self.cfg.model.vocab_size, self.default_tokenizer
            )
        return self._tokenizer

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The Flax module trained by this task."""

    @abc.abstractmethod
    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the right shapes and dtypes (for init and tracing)."""

    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's variables, from `model.init` on a batch."""

    @abc.abstractmethod
    def loss(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, dict[str, Metric]]:
        """(loss_sum, metric sums); pure, jit-able. metrics['loss'] = (loss_sum, weight)."""

    def data_vocabulary(self) -> Any:
        """What `make_batches` turns text into ids with (the tokenizer, unless the task has its own)."""
        return self.tokenizer

    def dataset(
        self,
        split: str,
        *,
        seed: int,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> grain.IterDataset:
        """Per-process batches (batch_size rows each) of `split`, repeating forever."""
        return type(self).make_batches(
            self.cfg,
            self.data_vocabulary(),
            split,
            seed=seed,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
        )

    def sample(self, params: Any, rng: jax.Array) -> str | None:
        """A short demonstration of the trained model for the end of a run (None = nothing)."""
        del params, rng
        return None

    def generate_text(self, params: Any, prompts: list[str], rng: jax.Array) -> list[str]:
        """The model's output text for each prompt, as `cfg.generate` says (`--generate`)."""
        del params, prompts, rng
        raise NotImplementedError(f"task {self.name!r} does not generate text")

    def evaluate_generation(
        self, params: Any, rng: jax.Array
    ) -> tuple[dict[str, float], list[dict[str, str]]] | None:
        """Metrics of generated text on the evaluation split after training, and the example
        predictions the loop writes to the workdir; None when the task has none."""
        del params, rng
        return None
