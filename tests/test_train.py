"""Losses, schedule, weight-decay mask, gradient accumulation and the pure train step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmflax.config import OptimizerConfig, load_config_file, override
from lmflax.core.losses import cross_entropy, finalize
from lmflax.core.optim import decay_mask, make_schedule


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5, 11)).astype(np.float32) * 4
    targets = rng.integers(0, 11, (3, 5))
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
    loss_sum, m = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    l64 = logits.astype(np.float64)
    logp = (
        l64
        - np.log(np.exp(l64 - l64.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - l64.max(-1, keepdims=True)
    )
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert abs(float(loss_sum) - (nll * weights).sum()) < 1e-4
    assert float(m["loss"][1]) == weights.sum()
    acc = ((l64.argmax(-1) == targets) * weights).sum()
    assert float(m["accuracy"][0]) == acc
    out = finalize(jax.device_get(m))
    assert abs(out["perplexity"] - np.exp((nll * weights).sum() / weights.sum())) < 1e-3


def test_cross_entropy_in_float32_for_bf16_logits():
    logits = jnp.full((2, 3, 50000), 1.0, jnp.bfloat16)
    loss_sum, _m = cross_entropy(logits, jnp.zeros((2, 3), jnp.int32))
    assert abs(float(loss_sum) / 6 - np.log(50000)) < 1e-3


def test_schedule_warmup_then_decay():
    opt = OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    s = make_schedule(opt, 110)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-6 and abs(float(s(10)) - 1.0) < 1e-6
    assert abs(float(s(60)) - (0.1 + 0.9 * 0.5)) < 1e-5  # halfway through the cosine
    assert abs(float(s(110)) - 0.1) < 1e-6
    lin = make_schedule(dataclasses.replace(opt, schedule="linear"), 110)
    assert abs(float(lin(60)) - 0.55) < 1e-5
    const = make_schedule(dataclasses.replace(opt, schedule="constant", warmup_steps=0), 110)
    assert float(const(77)) == 1.0


def test_weight_decay_skips_norms_and_biases():
    params = {
        "layers_0": {
            "attention": {"query": {"kernel": 1, "bias": 2}},
            "attention_norm": {"scale": 3, "bias": 4},
        },
        "token_embed": {"embedding": 5},
        "decoder_bias": 6,
    }
    mask = decay_mask(params)
    assert mask["layers_0"]["attention"]["query"] == {"kernel": True, "bias": False}
    assert mask["layers_0"]["attention_norm"] == {"scale": False, "bias": False}
    assert mask["token_embed"]["embedding"] is True and mask["decoder_bias"] is False


def _tiny_cfg(**updates):
    cfg, _ = load_config_file("gpt_tiny")
    return override(
        cfg,
        {
            "model.vocab_size": 64,
            "model.num_layers": 2,
            "model.d_model": 32,
            "model.d_ff": 64,
            "model.dropout_rate": 0.0,
            "model.attention_dropout_rate": 0.0,
            "data.batch_size": 8,
            "data.seq_len": 16,
            "mesh.data": 1,
            **updates,
        },
    )


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    ids = rng.integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "positions": np.broadcast_to(np.arange(T), (B, T)).astype(np.int32),
        "segment_ids": np.ones((B, T), np.int32),
        "weights": (rng.random((B, T)) > 0.2).astype(np.float32),
    }


def _one_step(cfg, batch):
    from lmflax.train import Trainer

    tr = Trainer.create(cfg)
    step = tr.jit_train_step()
    with tr.context():
        state, metrics = step(tr.state, tr.global_batch(batch), jax.random.key(0))
    return state, finalize(jax.device_get(metrics))


def test_gradient_accumulation_equals_full_batch():
    batch = _batch(_tiny_cfg())
    s1, m1 = _one_step(_tiny_cfg(), batch)
    s4, m4 = _one_step(_tiny_cfg(**{"optimizer.grad_accum_steps": 4}), batch)
    assert abs(m1["loss"] - m4["loss"]) < 1e-5 and abs(m1["grad_norm"] - m4["grad_norm"]) < 1e-5
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6),
        s1.params,
        s4.params,
    )


def test_train_step_overfits_a_batch_and_eval_agrees():
    from lmflax.train import Trainer

    cfg = _tiny_cfg(
        **{
            "optimizer.warmup_steps": 0,
            "optimizer.learning_rate": 1e-2,
            "optimizer.schedule": "constant",
        }
    )
    tr = Trainer.create(cfg)
    step, ev = tr.jit_train_step(), tr.jit_eval_step()
    batch = tr.global_batch(_batch(cfg))
    state = tr.state
    with tr.context():
        first = finalize(jax.device_get(ev(state, batch)))["loss"]
        for i in range(60):
            state, _m = step(state, batch, jax.random.key(i))
        last = finalize(jax.device_get(ev(state, batch)))
    assert abs(first - np.log(64)) < 0.3
    assert last["loss"] < 0.3 * first
    assert int(state.step) == 60


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_bf16_compute_keeps_float32_params(dtype):
    cfg = _tiny_cfg(**{"model.dtype": dtype})
    state, m = _one_step(cfg, _batch(cfg))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(
        x.dtype == jnp.float32
        for x in jax.tree.leaves(state.opt_state)
        if hasattr(x, "dtype") and x.ndim > 0
    )
    assert np.isfinite(m["loss"])
