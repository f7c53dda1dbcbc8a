"""word2vec training: negative-sampling loss over skip-gram or CBOW examples."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmflax.config import ConfigError
from lmflax.core.losses import Metric
from lmflax.data import word2vec as data_w2v
from lmflax.models.word2vec import Word2Vec, Word2VecConfig
from lmflax.tasks.base import Task
from lmflax.vectors import WordVectors, nearest

log = logging.getLogger(__name__)


def negative_sampling_loss(
    logits: jax.Array, targets: jax.Array, negatives: jax.Array, weights: jax.Array
) -> tuple[jax.Array, dict[str, Metric]]:
    """word2vec's objective, -log σ(s⁺) - Σₖ log σ(-sₖ⁻), summed over examples, in float32.

    logits [B, 1+K] (the target's score first, then the K noise words'), targets [B],
    negatives [B, K], weights [B]. A noise word equal to the target is skipped, as in word2vec.
    Metrics: 'loss' and 'accuracy' (the target outscores every noise word), per example.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    pos, neg = logits[:, 0], logits[:, 1:]
    valid = negatives != targets[:, None]
    per_example = jax.nn.softplus(-pos) + jnp.sum(jnp.where(valid, jax.nn.softplus(neg), 0.0), -1)
    loss_sum = jnp.sum(per_example * weights)
    count = jnp.sum(weights)
    best_noise = jnp.max(jnp.where(valid, neg, -jnp.inf), axis=-1)
    correct = jnp.sum((pos > best_noise) * weights)
    return loss_sum, {"loss": (loss_sum, count), "accuracy": (correct, count)}


class Word2VecTask(Task):
    """Trains `Word2Vec` on the words of `data.dataset`; the input table is the word vectors.

    Logged `tokens_per_sec` counts examples (data.seq_len is 1 in configs/word2vec.py), and
    `words_per_example` converts it to corpus words per second.
    """

    name = "word2vec"
    make_batches = staticmethod(data_w2v.word2vec_dataset)

    def build_model(self) -> Word2Vec:
        if not isinstance(self.cfg.model, Word2VecConfig):
            raise ConfigError(
                f"task 'word2vec' trains a word2vec model (model.family='word2vec'); model family "
                f"is {self.cfg.model.family!r}"
            )
        return Word2Vec(self.cfg.model)

    @property
    def tokenizer(self) -> data_w2v.Vocabulary:
        """The word vocabulary (counted over the training split and cached on first use)."""
        if self._tokenizer is None:
            m = self.cfg.model
            vocab = data_w2v.load_vocabulary(
                self.cfg.data, min_count=m.min_count, max_size=m.vocab_size, lowercase=m.lowercase
            )
            log.info(
                "word2vec vocabulary: %d words counted >= %d times (table of %d rows), "
                "%d corpus words",
                vocab.vocab_size,
                m.min_count,
                m.vocab_size,
                int(vocab.counts.sum()),
            )
            self._tokenizer = vocab
        return self._tokenizer

    @property
    def vocabulary(self) -> data_w2v.Vocabulary:
        return self.tokenizer

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        m = self.cfg.model
        C = m.num_inputs
        return {
            "inputs": np.zeros((batch_size, C), np.int32),
            "input_mask": np.ones((batch_size, C), np.float32),
            "targets": np.zeros((batch_size,), np.int32),
            "negatives": np.zeros((batch_size, m.negatives), np.int32),
            "weights": np.ones((batch_size,), np.float32),
            "words": np.zeros((batch_size,), np.float32),
        }

    def _candidates(self, batch: dict[str, Any]) -> jax.Array:
        return jnp.concatenate([batch["targets"][:, None], batch["negatives"]], axis=1)

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        return self.model.init(rng, batch["inputs"], batch["input_mask"], self._candidates(batch))

    def loss(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, dict[str, Metric]]:
        del rng, deterministic  # word2vec has no dropout
        logits = self.model.apply(
            {"params": params}, batch["inputs"], batch["input_mask"], self._candidates(batch)
        )
        loss_sum, metrics = negative_sampling_loss(
            logits, batch["targets"], batch["negatives"], batch["weights"]
        )
        metrics["words_per_example"] = (jnp.sum(batch["words"]), metrics["loss"][1])
        return loss_sum, metrics

    def data_vocabulary(self) -> Any:
        """word2vec's batches are made with its own word vocabulary, not a subword tokenizer."""
        return self.vocabulary

    def word_vectors(self, params: Any) -> Any:
        """The trained input vectors of the vocabulary's words, as `lmflax.vectors.WordVectors`."""
        table = np.asarray(jax.device_get(params["input_embed"]["embedding"]), np.float32)
        words = self.vocabulary.words
        return WordVectors(list(words), table[: len(words)])

    def sample(self, params: Any, rng: jax.Array) -> str | None:
        """Nearest neighbours (cosine) of the words of train.sample_prompt that are in the
        vocabulary (or of the three most frequent words)."""
        del rng
        if self.cfg.train.sample_tokens == 0:
            return None
        wv = self.word_vectors(params)
        vocab = self.vocabulary
        queries = [
            w
            for w in data_w2v.split_words(self.cfg.train.sample_prompt, vocab.lowercase)
            if w in vocab
        ] or list(vocab.words[:3])
        lines = []
        for word in queries:
            near = ", ".join(f"{w} {s:.2f}" for w, s in nearest(wv, word, k=6))
            lines.append(f"{word}: {near}")
        return "nearest neighbours (cosine)\n" + "\n".join(lines)
