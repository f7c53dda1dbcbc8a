"""Losses in float32, returned as sums so that micro-batches, batches and hosts aggregate exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Metric = tuple[jax.Array, jax.Array]  # (sum, count): the value is sum / count


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, dict[str, Metric]]:
    """Softmax cross-entropy of logits [..., V] against integer targets [...], in float32.

    weights [...] (default 1) scale each position; 0 excludes it. Returns (loss_sum, metrics) with
    metrics 'loss' = (Σ w·nll, Σ w) and 'accuracy' = (Σ w·[argmax == target], Σ w).
    """
    logits = logits.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[
        ..., 0
    ]
    nll = log_z - target_logit
    loss_sum = jnp.sum(nll * weights)
    count = jnp.sum(weights)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
    return loss_sum, {"loss": (loss_sum, count), "accuracy": (correct, count)}


def finalize(metrics: dict[str, Metric | jax.Array]) -> dict[str, float]:
    """(sum, count) pairs -> sum / count; plain scalars are totals (e.g. 'skipped' steps).
    Adds perplexity = exp(loss) when a loss is present."""
    out = {}
    for name, value in metrics.items():
        if not isinstance(value, tuple | list):
            out[name] = float(value)
            continue
        total, count = value
        count = float(count)
        out[name] = float(total) / count if count else float("nan")
    if "loss" in out:
        out["perplexity"] = float(jnp.exp(jnp.minimum(out["loss"], 80.0)))
    return out
