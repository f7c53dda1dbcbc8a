"""Language-model pretraining: causal LM (GPT) and masked LM (BERT)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmflax import decode
from lmflax.config import ConfigError
from lmflax.core.losses import Metric, chunked_cross_entropy, cross_entropy
from lmflax.data import pipeline
from lmflax.models import GPT, BertConfig, BertForMaskedLM, GPTConfig
from lmflax.tasks.base import Task


def _lm_loss(
    task: Task, params: Any, hidden: jax.Array, targets: jax.Array, weights: jax.Array | None
) -> tuple[jax.Array, dict[str, Metric]]:
    """The loss from final hidden states [B, T, D]: through the full logits, or chunked
    (task.loss_chunk_size) so the [B, T, V] float32 logits never exist."""
    model = task.model

    def logits_fn(p: Any, h: jax.Array) -> jax.Array:
        return model.apply({"params": p}, h, method="logits")

    chunk = task.cfg.task.loss_chunk_size
    if chunk:
        return chunked_cross_entropy(logits_fn, params, hidden, targets, weights, chunk_size=chunk)
    return cross_entropy(logits_fn(params, hidden), targets, weights)


class CausalLM(Task):
    """Next-token prediction with a GPT decoder on packed documents."""

    name = "causal_lm"
    make_batches = staticmethod(pipeline.causal_lm_dataset)
    default_tokenizer = "bpe"

    def build_model(self) -> GPT:
        if not isinstance(self.cfg.model, GPTConfig):
            raise ConfigError(
                f"task {self.name!r} trains a GPT decoder; model family is {self.cfg.model.family!r}"
            )
        return GPT(self.cfg.model)

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.cfg.data.seq_len)
        ints = np.zeros(shape, np.int32)
        return {
            "inputs": ints,
            "targets": ints,
            "positions": ints,
            "segment_ids": np.ones(shape, np.int32),
            "weights": np.ones(shape, np.float32),
        }

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        return self.model.init(
            rng,
            batch["inputs"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            deterministic=True,
        )

    def loss(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, dict[str, Metric]]:
        # positions/segment_ids/weights are optional: a batch of whole sequences (one document
        # per row, as in benchmarks) needs no document mask.
        hidden = self.model.apply(
            {"params": params},
            batch["inputs"],
            positions=batch.get("positions"),
            segment_ids=batch.get("segment_ids"),
            deterministic=deterministic,
            return_hidden=True,
            rngs={"dropout": rng},
        )
        return _lm_loss(self, params, hidden, batch["targets"], batch.get("weights"))

    def sample(self, params: Any, rng: jax.Array) -> str | None:
        t = self.cfg.train
        if t.sample_tokens == 0:
            return None
        tok = self.tokenizer
        prompt = self.prompt_ids(t.sample_prompt)
        limit = (
            self.cfg.model.max_len if self.cfg.model.position in ("learned", "sinusoidal") else None
        )
        new = (
            t.sample_tokens if limit is None else max(0, min(t.sample_tokens, limit - len(prompt)))
        )
        out = decode.generate(
            self.model,
            params,
            jnp.asarray([prompt], jnp.int32),
            max_new_tokens=new,
            rng=rng,
            temperature=t.sample_temperature,
            top_k=40,
        )
        return t.sample_prompt + tok.decode(np.asarray(out[0, len(prompt) :]))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids generation starts from: <|endoftext|> (GPT-2's document start) + the text."""
        return [self.tokenizer.eos_id, *self.tokenizer.encode(prompt)]

    def generate_text(self, params: Any, prompts: list[str], rng: jax.Array) -> list[str]:
        """Continues each prompt (left-padded into one batch), as `cfg.generate` says."""
        tok, c = self.tokenizer, self.cfg
        ids, mask = decode.left_pad([self.prompt_ids(p) for p in prompts], tok.pad_id)
        rows = -(-len(prompts) // jax.device_count()) * jax.device_count()  # the batch is sharded
        ids = np.concatenate([ids, np.repeat(ids[:1], rows - len(prompts), axis=0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], rows - len(prompts), axis=0)])
        new = c.generate.max_new_tokens or c.train.sample_tokens
        if c.model.position in ("learned", "sinusoidal"):
            new = min(new, c.model.max_len - ids.shape[1])
            if new < 1:
                raise ValueError(
                    f"the prompt has {ids.shape[1]} tokens, the model's positions stop at "
                    f"{c.model.max_len}: no room to generate"
                )
        out = decode.generate_tokens(
            c.generate,
            self.model,
            params,
            jnp.asarray(ids),
            max_new_tokens=new,
            rng=rng,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            prompt_mask=jnp.asarray(mask),
        )
        out = np.asarray(jax.device_get(out))[: len(prompts)]
        return [tok.decode(decode.until_eos(row, tok.eos_id)) for row in out]


class MaskedLM(Task):
    """BERT's masked language modelling (80/10/10), loss on the chosen positions only."""

    name = "mlm"
    make_batches = staticmethod(pipeline.mlm_dataset)
    default_tokenizer = "wordpiece"

    def build_model(self) -> BertForMaskedLM:
        if not isinstance(self.cfg.model, BertConfig):
            raise ConfigError(
                f"task 'mlm' trains a BERT encoder; model family is {self.cfg.model.family!r}"
            )
        return BertForMaskedLM(self.cfg.model)

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.cfg.data.seq_len)
        ints = np.zeros(shape, np.int32)
        return {
            "inputs": ints,
            "targets": ints,
            "weights": np.ones(shape, np.float32),
            "attention_mask": np.ones(shape, np.int32),
        }

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
        return self.model.init(rng, batch["inputs"], batch["attention_mask"], deterministic=True)

    def loss(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, dict[str, Metric]]:
        hidden = self.model.apply(
            {"params": params},
            batch["inputs"],
            batch.get("attention_mask"),  # optional: rows without padding need no mask
            deterministic=deterministic,
            return_hidden=True,
            rngs={"dropout": rng},
        )
        targets, weights = batch["targets"], batch["weights"]
        K = self.cfg.task.mlm_max_predictions
        if not K:
            return _lm_loss(self, params, hidden, targets, weights)
        # The output layer only where the loss is: the K highest-weight (= chosen) positions.
        _, idx = jax.lax.top_k(weights.astype(jnp.float32), K)
        take = lambda x: jnp.take_along_axis(x, idx.reshape(*idx.shape, *(1,) * (x.ndim - 2)), 1)  # noqa: E731
        loss, metrics = _lm_loss(self, params, take(hidden), take(targets), take(weights))
        dropped = jnp.sum(weights) - jnp.sum(take(weights))
        return loss, {**metrics, "mlm_dropped": (dropped, jnp.ones((), jnp.float32))}

    def sample(self, params: Any, rng: jax.Array) -> str | None:
        """Fills the [MASK]s of a fixed sentence with the model's top predictions."""
        del rng
        if self.cfg.train.sample_tokens == 0:
            return None
        tok = self.tokenizer
        text = "def main ( ) : return [MASK] ( args ) [MASK] none"
        ids = [tok.cls_id]
        for word in text.split():
            ids += [tok.mask_id] if word == "[MASK]" else tok.encode(word)
        ids.append(tok.sep_id)
        arr = jnp.asarray([ids], jnp.int32)
        logits = self.model.apply({"params": params}, arr, jnp.ones_like(arr), deterministic=True)
        pred = np.asarray(jnp.argmax(logits[0], axis=-1))
        filled = [int(pred[i]) if t == tok.mask_id else t for i, t in enumerate(ids)]
        return f"{text}  ->  {tok.decode(filled[1:-1])}"
