"""Generation with the KV cache against full forward passes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmflax import decode
from lmflax.models import GPT, PRESETS


def test_greedy_generate_equals_full_forward_argmax():
    cfg = dataclasses.replace(
        PRESETS["gpt_tiny"],
        vocab_size=61,
        num_layers=2,
        d_model=32,
        d_ff=64,
        num_kv_heads=2,
        max_len=32,
    )
    model = GPT(cfg)
    prompt = jnp.array([[1, 5, 9], [2, 2, 7]], jnp.int32)
    params = model.init(jax.random.key(0), prompt, deterministic=True)["params"]
    out = decode.generate(
        model, params, prompt, max_new_tokens=6, rng=jax.random.key(1), temperature=0.0
    )
    forward = jax.jit(lambda ids: model.apply({"params": params}, ids, deterministic=True))
    ids = np.asarray(prompt)
    for _ in range(6):
        nxt = np.asarray(jnp.argmax(forward(jnp.asarray(ids))[:, -1], -1))[:, None]
        ids = np.concatenate([ids, nxt], 1)
    np.testing.assert_array_equal(np.asarray(out), ids)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    greedy = decode.sample_logits(logits, jax.random.key(1), temperature=0.0)
    np.testing.assert_array_equal(
        np.asarray(decode.sample_logits(logits, jax.random.key(5), top_k=1)), np.asarray(greedy)
    )
    a = decode.sample_logits(logits, jax.random.key(2), temperature=1.0)
    b = decode.sample_logits(logits, jax.random.key(2), temperature=1.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    for seed in range(20):
        s = np.asarray(decode.sample_logits(logits, jax.random.key(seed), top_k=3))
        assert all(s[i] in top3[i] for i in range(4))
