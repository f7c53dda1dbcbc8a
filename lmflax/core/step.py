"""Pure train and eval steps: no I/O, no clocks; jit them with shardings in the loop."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lmflax.core.losses import Metric
from lmflax.core.state import TrainState


def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _grads_and_metrics(
    state: TrainState, batch: dict[str, jax.Array], rng: jax.Array
) -> tuple[Any, dict[str, Metric]]:
    """Gradients of the summed loss and the metric sums, over grad_accum_steps micro-batches."""
    grad_fn = jax.value_and_grad(state.loss, has_aux=True)
    A = state.grad_accum_steps
    if A == 1:
        (_, metrics), grads = grad_fn(state.params, batch, rng, False)
        return grads, metrics

    micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)

    def body(carry: tuple[Any, Any], inputs: tuple[Any, jax.Array]) -> tuple[tuple[Any, Any], None]:
        grads, metrics = carry
        mb, i = inputs
        (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), False)
        return (_add(grads, g), _add(metrics, m)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (_, m0), g0 = grad_fn(state.params, first, jax.random.fold_in(rng, 0), False)
    rest = jax.tree.map(lambda x: x[1:], micro)
    (grads, metrics), _ = jax.lax.scan(body, (g0, m0), (rest, jnp.arange(1, A)))
    return grads, metrics


def train_step(
    state: TrainState, batch: dict[str, jax.Array], rng: jax.Array
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer update. Returns the new state and metrics: the task's (sum, count) pairs
    (loss, accuracy, ...), grad_norm and learning_rate (count 1), and 'skipped' (a plain sum:
    1 if this step's update was dropped).

    The gradient is that of the weighted mean loss over the whole global batch, however it is
    split into micro-batches: summed losses are differentiated and divided by the total weight.
    If the loss or the gradient is not finite the update is dropped: parameters and optimizer
    state come back bit-for-bit unchanged (only the step counter advances) and 'skipped' is 1.
    """
    grads, metrics = _grads_and_metrics(state, batch, rng)
    weight = jnp.maximum(metrics["loss"][1], 1.0)
    grads = jax.tree.map(lambda g: g / weight.astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"][0]) & jnp.isfinite(grad_norm)

    updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A select, not lax.cond: XLA fuses it into the optimizer's elementwise update, which then
    # writes the donated buffers in place. A cond's results are copied into the outputs instead
    # (compiled for an H200: ~600 extra copy kernels per GPT-2 step, one per state array).
    keep_if_bad = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep_if_bad, new_params, state.params)
    opt_state = jax.tree.map(keep_if_bad, new_opt_state, state.opt_state)
    one = jnp.ones((), jnp.float32)
    metrics = {
        **metrics,
        "grad_norm": (grad_norm.astype(jnp.float32), one),
        "learning_rate": (jnp.asarray(state.schedule(state.step), jnp.float32), one),
        "skipped": 1.0 - finite.astype(jnp.float32),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, Metric]:
    """Metric sums on one batch, deterministic (no dropout)."""
    _, metrics = state.loss(state.params, batch, jax.random.key(0), True)
    return metrics
