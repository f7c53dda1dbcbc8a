"""Losses in float32, returned as sums so that micro-batches, batches and hosts aggregate exactly."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

Metric = tuple[jax.Array, jax.Array]  # (sum, count): the value is sum / count


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, dict[str, Metric]]:
    """Softmax cross-entropy of logits [..., V] against integer targets [...], in float32.

    weights [...] (default 1) scale each position; 0 excludes it. Returns (loss_sum, metrics) with
    metrics 'loss' = (Σ w·nll, Σ w) and 'accuracy' = (Σ w·[target's logit is the largest], Σ w)
    (= argmax == target but for exact ties, and without another pass over the logits).
    """
    logits = logits.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z, target, correct = _softmax_stats(logits, targets)
    loss_sum = jnp.sum((log_z - target) * weights)
    count = jnp.sum(weights)
    return loss_sum, {"loss": (loss_sum, count), "accuracy": (jnp.sum(correct * weights), count)}


def _softmax_stats(
    logits32: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log Σ exp(logits), the target's logit, and [the target's logit is the row maximum], from
    one max and one sum of exponentials over the vocabulary (no separate argmax pass)."""
    m = jax.lax.stop_gradient(jnp.max(logits32, axis=-1))
    log_z = m + jnp.log(jnp.sum(jnp.exp(logits32 - m[..., None]), axis=-1))
    target = jnp.take_along_axis(logits32, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_z, target, (target >= m).astype(jnp.float32)


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


def chunked_cross_entropy(
    logits_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    chunk_size: int,
) -> tuple[jax.Array, dict[str, Metric]]:
    """`cross_entropy(logits_fn(params, hidden), targets, weights)` without ever materialising
    the full [B, T, V] logits, in the forward or the backward pass.

    hidden [B, T, D] (the model's final hidden states), targets/weights [B, T]. The positions are
    taken chunk_size at a time along T (every row in each chunk, so a batch-sharded computation
    keeps all devices busy): a chunk's logits [B, chunk_size, V] are computed, reduced to its
    loss, accuracy and, for training, its gradients — the softmax minus the one-hot, pulled back
    through `logits_fn` at once — and dropped. The backward pass only scales those gradients by
    the incoming cotangent, so no logits are recomputed. Values and gradients equal the plain
    loss's up to float rounding. T need not divide by chunk_size (the tail is padded with weight
    0). `logits_fn(params, h)` may read any part of `params`; only what it uses is differentiated.
    """
    if hidden.ndim != 3:
        raise ValueError(f"chunked_cross_entropy takes hidden [B, T, D], got shape {hidden.shape}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    B, T, D = hidden.shape
    if targets.shape != (B, T):
        raise ValueError(f"targets {targets.shape} do not match hidden {hidden.shape}")
    weights = jnp.ones((B, T), jnp.float32) if weights is None else weights
    weights = weights.astype(jnp.float32)
    C = min(chunk_size, T)
    n = -(-T // C)
    pad = n * C - T
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    def chunks(x: jax.Array) -> jax.Array:  # [B, n·C, ...] -> [n, B, C, ...]
        return jnp.moveaxis(x.reshape(B, n, C, *x.shape[2:]), 1, 0)

    head, rebuild = _used_subtree(logits_fn, params, jax.ShapeDtypeStruct((B, C, D), hidden.dtype))
    fn = _HeadFn(logits_fn, rebuild)
    loss_sum, correct, count = _chunked_ce(
        fn, head, chunks(hidden), chunks(targets.astype(jnp.int32)), chunks(weights)
    )
    return loss_sum, {"loss": (loss_sum, count), "accuracy": (correct, count)}


class _HeadFn:
    """logits_fn over the used part of params only (hashable by identity for custom_vjp)."""

    def __init__(self, logits_fn: Callable[[Any, jax.Array], jax.Array], rebuild: Callable):
        self.logits_fn, self.rebuild = logits_fn, rebuild

    def __call__(self, head: list[jax.Array], h: jax.Array) -> jax.Array:
        return self.logits_fn(self.rebuild(head), h)


def _used_subtree(
    logits_fn: Callable[[Any, jax.Array], jax.Array], params: Any, h: jax.ShapeDtypeStruct
) -> tuple[list[jax.Array], Callable[[list[jax.Array]], Any]]:
    """The leaves of params that logits_fn reads, and how to rebuild a params tree from them
    (unused leaves become None), found by tracing logits_fn once."""
    leaves, treedef = jax.tree.flatten(params)
    jaxpr = jax.make_jaxpr(lambda ls, h: logits_fn(treedef.unflatten(ls), h))(leaves, h).jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, jex_core.Var)}
    read |= {id(v) for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
    used = [i for i, v in enumerate(jaxpr.invars[: len(leaves)]) if id(v) in read]

    def rebuild(head: list[jax.Array]) -> Any:
        full: list[Any] = [None] * len(leaves)
        for i, leaf in zip(used, head):
            full[i] = leaf
        return treedef.unflatten(full)

    return [leaves[i] for i in used], rebuild


def _ce_chunks(
    fn: _HeadFn,
    head: list[jax.Array],
    h: jax.Array,
    t: jax.Array,
    w: jax.Array,
    *,
    grads: bool,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], Any]:
    """Scans the chunks: sums (loss, correct, count) and, with grads, the gradients of the loss
    sum w.r.t. head [same tree], h [n, B, C, D] and w [n, B, C]."""

    def body(carry: Any, xs: Any) -> Any:
        loss, correct, dhead = carry
        h_c, t_c, w_c = xs
        if grads:
            logits, pullback = jax.vjp(fn, head, h_c)
        else:
            logits = fn(head, h_c)
        logits32 = logits.astype(jnp.float32)
        log_z, target, hit = _softmax_stats(logits32, t_c)
        nll = log_z - target
        loss = loss + jnp.sum(nll * w_c)
        correct = correct + jnp.sum(hit * w_c)
        if not grads:
            return (loss, correct, dhead), None
        # d(Σ w·nll)/d logits = w · (softmax - onehot(target)), in the logits' dtype as autodiff
        # of the plain loss would give it.
        p = jnp.exp(logits32 - log_z[..., None])
        hit = jnp.arange(logits.shape[-1]) == t_c[..., None]
        dlogits = ((p - hit) * w_c[..., None]).astype(logits.dtype)
        dh_c, dhead_c = pullback(dlogits)[::-1]
        dhead = jax.tree.map(jnp.add, dhead, dhead_c)
        return (loss, correct, dhead), (dh_c, nll)

    zero = jnp.zeros((), jnp.float32)
    dhead0 = jax.tree.map(jnp.zeros_like, head) if grads else None
    (loss, correct, dhead), per_chunk = jax.lax.scan(body, (zero, zero, dhead0), (h, t, w))
    return (loss, correct, jnp.sum(w)), (dhead, per_chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_ce(
    fn: _HeadFn, head: list[jax.Array], h: jax.Array, t: jax.Array, w: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    return _ce_chunks(fn, head, h, t, w, grads=False)[0]


def _chunked_ce_fwd(fn: _HeadFn, head: Any, h: jax.Array, t: jax.Array, w: jax.Array) -> Any:
    sums, (dhead, (dh, nll)) = _ce_chunks(fn, head, h, t, w, grads=True)
    return sums, (dhead, dh, nll, t)


def _chunked_ce_bwd(fn: _HeadFn, res: Any, g: Any) -> Any:
    del fn
    dhead, dh, nll, t = res
    g_loss = g[0]  # accuracy and count are not differentiable
    return (
        jax.tree.map(lambda x: x * g_loss.astype(x.dtype), dhead),
        dh * g_loss.astype(dh.dtype),
        np.zeros(t.shape, jax.dtypes.float0),
        nll * g_loss,
    )


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
