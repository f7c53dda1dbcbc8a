"""The chunked cross-entropy against a float64 NumPy reference and the plain loss (values and
gradients), its memory (the full logits never exist), and its wiring into the LM tasks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmflax.config import Config, ConfigError, TaskConfig, override
from lmflax.core.losses import chunked_cross_entropy, cross_entropy
from lmflax.models import PRESETS
from lmflax.nn import unbox
from lmflax.tasks import make_task
from lmflax.train import resolve


def _reference(h, W, b, targets, weights):
    """Loss, accuracy and gradients (h, W, b, weights) in float64 from the formulas."""
    h, W, b, w = (np.asarray(a, np.float64) for a in (h, W, b, weights))
    logits = h @ W + b  # [B, T, V]
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    p = np.exp(logits - log_z[..., None])
    onehot = np.eye(W.shape[1])[targets]
    dlogits = (p - onehot) * w[..., None]
    correct = ((logits.argmax(-1) == targets) * w).sum()
    grads = {
        "h": dlogits @ W.T,
        "W": np.einsum("btd,btv->dv", h, dlogits),
        "b": dlogits.sum((0, 1)),
        "w": nll,
    }
    return (nll * w).sum(), correct, grads


def _head(p, h):
    return h @ p["W"] + p["b"]


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_chunked_matches_reference_and_plain_loss(chunk):
    rng = np.random.default_rng(chunk)
    B, T, D, V = 3, 13, 8, 50  # T is not a multiple of the chunk (the tail is padded)
    h = rng.standard_normal((B, T, D)).astype(np.float32)
    params = {
        "W": rng.standard_normal((D, V)).astype(np.float32),
        "b": rng.standard_normal(V).astype(np.float32),
        "unused": np.ones((5, 5), np.float32),  # the head never reads it: its gradient is zero
    }
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    weights = (rng.random((B, T)) > 0.3).astype(np.float32)

    def chunked(params, h, w):
        return chunked_cross_entropy(_head, params, h, targets, w, chunk_size=chunk)

    def plain(params, h, w):
        return cross_entropy(_head(params, h), targets, w)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))  # noqa: E731
    (loss, metrics), (gp, gh, gw) = grad(chunked)(params, h, weights)
    (loss_p, metrics_p), (gp_p, gh_p, gw_p) = grad(plain)(params, h, weights)
    ref_loss, ref_correct, ref = _reference(h, params["W"], params["b"], targets, weights)

    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert float(metrics["accuracy"][0]) == ref_correct == float(metrics_p["accuracy"][0])
    assert float(metrics["loss"][1]) == weights.sum() == float(metrics_p["loss"][1])
    for got, want in [(gh, ref["h"]), (gp["W"], ref["W"]), (gp["b"], ref["b"]), (gw, ref["w"])]:
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(gp["unused"]), 0.0)
    # ... and the plain loss agrees to float32 rounding.
    np.testing.assert_allclose(float(loss), float(loss_p), rtol=1e-6)
    for a, b in zip(jax.tree.leaves((gp, gh, gw)), jax.tree.leaves((gp_p, gh_p, gw_p))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_chunked_never_materialises_the_logits():
    B, T, D, V = 4, 256, 16, 8192
    logits_bytes = B * T * V * 4  # 32 MiB of float32 logits
    args = (
        {
            "W": jax.ShapeDtypeStruct((D, V), jnp.float32),
            "b": jax.ShapeDtypeStruct((V,), jnp.float32),
        },
        jax.ShapeDtypeStruct((B, T, D), jnp.float32),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
    )

    def temp_bytes(loss_fn):
        step = jax.jit(jax.grad(lambda p, h, t: loss_fn(p, h, t)[0], argnums=(0, 1)))
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    plain = temp_bytes(lambda p, h, t: cross_entropy(_head(p, h), t))
    chunked = temp_bytes(lambda p, h, t: chunked_cross_entropy(_head, p, h, t, chunk_size=16))
    assert plain >= logits_bytes  # the plain loss holds them (this test can fail)
    assert chunked < logits_bytes / 4, (chunked, plain)


def _task(name, **task_kw):
    model = dataclasses.replace(
        PRESETS["gpt_tiny" if name == "causal_lm" else "bert_tiny"],
        num_layers=1,
        d_model=32,
        num_heads=2,
        d_ff=64,
        vocab_size=128,
    )
    cfg = Config(model=model, task=TaskConfig(name=name, **task_kw))
    cfg = override(cfg, {"data.seq_len": 16})
    return make_task(resolve(cfg))


def _batch(task, rng, weights=None):
    batch = {k: np.asarray(v) for k, v in task.dummy_batch(2).items()}
    batch["inputs"] = rng.integers(0, 128, batch["inputs"].shape).astype(np.int32)
    batch["targets"] = rng.integers(0, 128, batch["targets"].shape).astype(np.int32)
    if weights is None:
        weights = (rng.random(batch["weights"].shape) > 0.5).astype(np.float32)
    batch["weights"] = weights
    return batch


def _loss_and_grads(task, params, batch):
    f = jax.value_and_grad(lambda p: task.loss(p, batch, jax.random.key(1), True), has_aux=True)
    return jax.jit(f)(params)


def _assert_same(a, b):
    (loss_a, _), g_a = a
    (loss_b, _), g_b = b
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6, rtol=1e-4)


def test_causal_lm_chunked_loss_equals_plain_loss():
    plain, chunked = _task("causal_lm"), _task("causal_lm", loss_chunk_size=5)
    batch = _batch(plain, np.random.default_rng(0))
    params = unbox(jax.jit(plain.init)(jax.random.key(0), batch))["params"]
    _assert_same(_loss_and_grads(plain, params, batch), _loss_and_grads(chunked, params, batch))


def test_mlm_gathered_and_chunked_loss_equals_plain_loss():
    """mlm_max_predictions gathers the chosen positions before the output layer (here with the
    chunked loss too): same loss and gradients; positions beyond the cap are counted."""
    plain = _task("mlm")
    fast = _task("mlm", mlm_max_predictions=6, loss_chunk_size=4)
    weights = np.zeros((2, 16), np.float32)
    weights[0, [1, 5, 9]] = 1.0
    weights[1, [0, 2, 3, 4, 15]] = 1.0
    batch = _batch(plain, np.random.default_rng(2), weights)
    params = unbox(jax.jit(plain.init)(jax.random.key(0), batch))["params"]
    a, b = _loss_and_grads(plain, params, batch), _loss_and_grads(fast, params, batch)
    _assert_same(a, b)
    assert float(b[0][1]["loss"][1]) == 8.0 and float(b[0][1]["mlm_dropped"][0]) == 0.0
    capped = _task("mlm", mlm_max_predictions=2)
    _, m = jax.jit(lambda p: capped.loss(p, batch, jax.random.key(1), True))(params)
    assert float(m["loss"][1]) == 4.0 and float(m["mlm_dropped"][0]) == 4.0


def test_loss_knobs_are_validated():
    cfg = Config(model=PRESETS["bert_tiny"], task=TaskConfig(name="mlm"))
    with pytest.raises(ConfigError, match="loss_chunk_size must be >= 0"):
        resolve(override(cfg, {"task.loss_chunk_size": -1}))
    with pytest.raises(ConfigError, match=r"more than data\.seq_len"):
        resolve(override(cfg, {"task.mlm_max_predictions": 1000}))
    gpt = Config(model=PRESETS["gpt_tiny"])
    with pytest.raises(ConfigError, match="for task 'mlm'"):
        resolve(override(gpt, {"task.mlm_max_predictions": 4}))
