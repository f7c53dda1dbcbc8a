"""Sequence-to-sequence training (translation, summarization) with an encoder-decoder.

Teacher-forced cross-entropy on padded pairs; after training the model decodes the first
`generate.eval_examples` pairs of the evaluation split (beam search or sampling, per
`cfg.generate`) and the detokenized outputs are scored with `task.metrics` (BLEU, ROUGE).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmflax import decode
from lmflax.config import Config, ConfigError
from lmflax.core.losses import Metric, cross_entropy
from lmflax.data import seq2seq as data
from lmflax.data.tokenizers import Tokenizer
from lmflax.evaluate.generation import generation_metrics
from lmflax.models import EncoderDecoder, Seq2SeqConfig
from lmflax.tasks.base import Task


def seq2seq_loss(
    model: EncoderDecoder,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    deterministic: bool,
) -> tuple[jax.Array, dict[str, Metric]]:
    """Summed cross-entropy of the targets given the inputs and the shifted targets."""
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        batch["decoder_inputs"],
        inputs_mask=batch["inputs_mask"],
        deterministic=deterministic,
        rngs={"dropout": rng},
    )
    return cross_entropy(logits, batch["targets"], batch["weights"])


class Seq2Seq(Task):
    """An encoder-decoder trained on (source, target) text pairs."""

    name = "seq2seq"
    make_batches = staticmethod(data.seq2seq_dataset)
    default_tokenizer = "bpe"

    def __init__(self, cfg: Config):
        data.register_tfds_builder(cfg.data.dataset)
        super().__init__(cfg)

    def build_model(self) -> EncoderDecoder:
        c = self.cfg
        if not isinstance(c.model, Seq2SeqConfig):
            raise ConfigError(
                f"task 'seq2seq' trains an encoder-decoder; model family is {c.model.family!r} "
                "(use a seq2seq preset, e.g. --config.model=transformer_tiny)"
            )
        if c.model.position in ("learned", "sinusoidal") and c.task.target_len > c.model.max_len:
            raise ConfigError(
                f"task.target_len ({c.task.target_len}) is longer than the model's "
                f"{c.model.position} positions (model.max_len={c.model.max_len})"
            )
        ids = {
            "task.decoder_start_id": c.task.decoder_start_id,
            "generate.forced_bos_id": c.generate.forced_bos_id,
            "generate.forced_eos_id": c.generate.forced_eos_id,
            **{f"generate.banned_ids[{i}]": t for i, t in enumerate(c.generate.banned_ids)},
        }
        outside = [f"{k}={v}" for k, v in ids.items() if v >= c.model.vocab_size]
        if outside:
            raise ConfigError(
                f"token ids outside the model's vocabulary (model.vocab_size="
                f"{c.model.vocab_size}): {', '.join(outside)}"
            )
        return EncoderDecoder(c.model)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = data.load_pair_tokenizer(self.cfg)
        return self._tokenizer

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        S, T = self.cfg.data.seq_len, self.cfg.task.target_len
        return {
            "inputs": np.zeros((batch_size, S), np.int32),
            "inputs_mask": np.ones((batch_size, S), np.int32),
            "decoder_inputs": np.zeros((batch_size, T), np.int32),
            "targets": np.zeros((batch_size, T), np.int32),
            "weights": np.ones((batch_size, T), np.float32),
        }

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        return self.model.init(
            rng,
            batch["inputs"],
            batch["decoder_inputs"],
            inputs_mask=batch["inputs_mask"],
            deterministic=True,
        )

    def loss(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, dict[str, Metric]]:
        return seq2seq_loss(self.model, params, batch, rng, deterministic)

    def generate_text(self, params: Any, prompts: list[str], rng: jax.Array) -> list[str]:
        """Translates / summarises each source text, in batches of data.batch_size rows."""
        tok, c = self.tokenizer, self.cfg
        eos = data.end_id(tok)
        start = data.start_id(tok, c.task.decoder_start_id)
        new_tokens = c.generate.max_new_tokens or c.task.target_len
        # Batches of data.batch_size rows (rounded up to the device count: the batch is sharded),
        # one compiled shape for every call; the last is padded with copies of a source.
        rows = -(-c.data.batch_size // jax.device_count()) * jax.device_count()
        outputs: list[str] = []
        for start in range(0, len(prompts), rows):
            chunk = prompts[start : start + rows]
            encoded = [data.encode_source(tok, text, c.data.seq_len) for text in chunk]
            encoded += [encoded[0]] * (rows - len(chunk))
            ids = jnp.asarray(np.stack([e[0] for e in encoded]))
            mask = jnp.asarray(np.stack([e[1] for e in encoded]))
            new = decode.generate_tokens(
                c.generate,
                self.model,
                params,
                jnp.full((rows, 1), start, jnp.int32),
                max_new_tokens=new_tokens,
                rng=jax.random.fold_in(rng, start),
                eos_id=eos,
                pad_id=tok.pad_id,
                encoder_inputs=ids,
                encoder_mask=mask,
            )
            new = np.asarray(jax.device_get(new))
            outputs += [tok.decode(decode.until_eos(row, eos)) for row in new[: len(chunk)]]
        return outputs

    def evaluate_generation(
        self, params: Any, rng: jax.Array
    ) -> tuple[dict[str, float], list[dict[str, str]]] | None:
        c = self.cfg
        if not c.generate.eval_examples or not c.data.eval_split:
            return None
        pairs = data.eval_pairs(c, c.data.eval_split, c.generate.eval_examples)
        predictions = self.generate_text(params, [s for s, _ in pairs], rng)
        references = [t for _, t in pairs]
        metrics = generation_metrics(c.task.metrics, predictions, references)
        examples = [
            {"source": s, "reference": t, "prediction": p}
            for (s, t), p in zip(pairs, predictions, strict=True)
        ]
        return metrics, examples

    def sample(self, params: Any, rng: jax.Array) -> str | None:
        """train.sample_prompt as a source text, and the model's output for it."""
        t = self.cfg.train
        if t.sample_tokens == 0 or not t.sample_prompt.strip():
            return None
        return f"{t.sample_prompt}  ->  {self.generate_text(params, [t.sample_prompt], rng)[0]}"
