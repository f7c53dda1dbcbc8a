"""Positions, norms, feed-forward and embeddings against formulas written in NumPy (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmflax import nn as lnn


@pytest.mark.parametrize("length,dim", [(1, 2), (50, 16), (7, 5), (128, 64)])
def test_sinusoidal_positions_formula(length, dim):
    table = np.asarray(lnn.sinusoidal_positions(length, dim))
    assert table.shape == (length, dim) and table.dtype == np.float32
    for p in range(length):
        for j in range(dim):
            i = j // 2
            angle = p / 10000 ** (2 * i / dim)
            want = np.sin(angle) if j % 2 == 0 else np.cos(angle)
            assert abs(table[p, j] - want) < 1e-6


def test_sinusoidal_rejects_bad_sizes():
    with pytest.raises(ValueError):
        lnn.sinusoidal_positions(4, 0)


def test_rope_is_relative_and_norm_preserving():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float32)

    def score(pq, pk):
        rq = lnn.apply_rope(q, jnp.array([[pq]]))
        rk = lnn.apply_rope(k, jnp.array([[pk]]))
        return np.asarray(jnp.sum(rq * rk, -1))

    np.testing.assert_allclose(score(3, 1), score(10, 8), atol=1e-5)
    np.testing.assert_allclose(score(0, 0), np.asarray(jnp.sum(q * k, -1)), atol=1e-6)
    rotated = lnn.apply_rope(q, jnp.array([[17]]))
    np.testing.assert_allclose(
        np.linalg.norm(rotated, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5
    )


def test_rope_matches_rotation_formula():
    """Pair (i, i + H/2) is rotated by angle p · base^(-2i/H)."""
    H, p, base = 8, 5, 10000.0
    x = np.arange(1, H + 1, dtype=np.float64)
    got = np.asarray(
        lnn.apply_rope(jnp.asarray(x, jnp.float32)[None, None, None], jnp.array([[p]]))
    )[0, 0, 0]
    want = x.copy()
    for i in range(H // 2):
        a = p * base ** (-2 * i / H)
        x1, x2 = x[i], x[i + H // 2]
        want[i] = x1 * np.cos(a) - x2 * np.sin(a)
        want[i + H // 2] = x2 * np.cos(a) + x1 * np.sin(a)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_layernorm_and_rmsnorm():
    x = np.random.default_rng(1).standard_normal((3, 4, 10)).astype(np.float32) * 3 + 1
    ln = lnn.LayerNorm(eps=1e-5)
    p = ln.init(jax.random.key(0), x)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(ln.apply(p, x)), want, atol=1e-5)
    rms = lnn.RMSNorm(eps=1e-6)
    p = rms.init(jax.random.key(0), x)
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(rms.apply(p, x)), want, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"])
def test_feedforward_formula(activation):
    from math import erf

    x = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32)
    ff = lnn.FeedForward(d_ff=16, activation=activation)
    params = lnn.unbox(ff.init(jax.random.key(0), x, deterministic=True)["params"])
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    acts = {
        "relu": lambda h: np.maximum(h, 0),
        "gelu": np.vectorize(lambda h: 0.5 * h * (1 + erf(h / np.sqrt(2)))),
        "gelu_tanh": lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))),
        "silu": lambda h: h / (1 + np.exp(-h)),
    }
    gated = {"swiglu": "silu", "geglu": "gelu_tanh"}
    h = x @ P["wi"]["kernel"] + P["wi"]["bias"]
    if activation in gated:
        g = x @ P["wi_gate"]["kernel"] + P["wi_gate"]["bias"]
        h = acts[gated[activation]](g) * h
    else:
        h = acts[activation](h)
    want = h @ P["wo"]["kernel"] + P["wo"]["bias"]
    np.testing.assert_allclose(
        np.asarray(ff.apply({"params": params}, x, deterministic=True)), want, atol=1e-5
    )


def test_feedforward_rejects_unknown_activation():
    with pytest.raises(ValueError, match="accepted"):
        lnn.FeedForward(d_ff=4, activation="tanhh").init(
            jax.random.key(0), jnp.ones((1, 1, 2)), deterministic=True
        )


def test_embed_lookup_attend_and_one_hot():
    ids = jnp.array([[0, 3, 2], [1, 1, 0]])
    e = lnn.Embed(5, 4)
    p = e.init(jax.random.key(0), ids)
    table = np.asarray(lnn.unbox(p)["params"]["embedding"])
    np.testing.assert_array_equal(np.asarray(e.apply(p, ids)), table[np.asarray(ids)])
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(np.asarray(e.apply(p, x, method="attend")), x @ table.T, atol=1e-6)
    oh = lnn.Embed(5, 4, one_hot=True)
    np.testing.assert_allclose(np.asarray(oh.apply(p, ids)), table[np.asarray(ids)], atol=1e-6)


def test_parameters_carry_logical_axis_names():
    import flax.linen as nn

    m = lnn.MultiHeadAttention(num_heads=2)
    boxed = m.init(jax.random.key(0), jnp.ones((1, 3, 8)), deterministic=True)["params"]
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["out"]["kernel"]) == ("heads", "kv", "embed")
    ff = lnn.FeedForward(d_ff=4)
    specs = nn.get_partition_spec(
        ff.init(jax.random.key(0), jnp.ones((1, 1, 2)), deterministic=True)["params"]
    )
    assert tuple(specs["wi"]["kernel"]) == ("embed", "mlp")


def test_norms_compute_in_float32_and_return_compute_dtype():
    x = (np.random.default_rng(3).standard_normal((2, 6)) * 100).astype(np.float32)
    ln = lnn.LayerNorm(dtype="bfloat16")
    p = ln.init(jax.random.key(0), x)
    y = ln.apply(p, jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert np.allclose(np.asarray(y, np.float32).mean(-1), 0, atol=0.05)
