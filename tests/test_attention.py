"""dot_product_attention and MultiHeadAttention against a float64 NumPy reference and properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmflax import nn as lnn


def reference_attention(q, k, v, mask=None, bias=None):
    """softmax(QKᵀ/√d + bias)V in float64, written from the formula; GQA by repeating kv heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    _B, _T, N, H = q.shape
    _S, K = k.shape[1], k.shape[2]
    k = np.repeat(k, N // K, axis=2)
    v = np.repeat(v, N // K, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if mask is not None:
        mask = np.broadcast_to(np.asarray(mask, bool), logits.shape)
        logits = np.where(mask, logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(logits - m)
    denom = e.sum(-1, keepdims=True)
    w = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
    return np.einsum("bnts,bsnh->btnh", w, v)


def _qkv(rng, B, T, S, N, K, H):
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, H)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_random_shapes(seed):
    rng = np.random.default_rng(seed)
    B, T, S = rng.integers(1, 4), rng.integers(1, 9), rng.integers(1, 9)
    K = int(rng.choice([1, 2, 3]))
    N = K * int(rng.choice([1, 2, 4]))
    H = int(rng.choice([4, 8, 16]))
    q, k, v = _qkv(rng, B, T, S, N, K, H)
    for mask in [None, rng.random((B, 1, T, S)) > 0.3, rng.random((B, N, T, S)) > 0.5]:
        got = lnn.dot_product_attention(q, k, v, mask=mask)
        np.testing.assert_allclose(
            np.asarray(got), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5
        )


def test_padding_and_causal_masks():
    rng = np.random.default_rng(1)
    B, T, N, H = 3, 7, 4, 8
    q, k, v = _qkv(rng, B, T, T, N, 2, H)
    lengths = np.array([7, 4, 1])
    valid = np.arange(T)[None, :] < lengths[:, None]
    pad = lnn.padding_mask(valid)
    causal = np.tril(np.ones((T, T), bool))[None, None]
    np.testing.assert_allclose(
        np.asarray(lnn.dot_product_attention(q, k, v, mask=pad)),
        reference_attention(q, k, v, np.asarray(pad)),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(lnn.dot_product_attention(q, k, v, is_causal=True)),
        reference_attention(q, k, v, causal),
        atol=1e-5,
    )
    both = np.asarray(pad) & causal
    np.testing.assert_allclose(
        np.asarray(lnn.dot_product_attention(q, k, v, mask=pad, is_causal=True)),
        reference_attention(q, k, v, both),
        atol=1e-5,
    )


def test_causal_with_longer_keys_sees_prefix():
    """T < S: the queries are the last T positions (decoding after a cached prefix)."""
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 2, 3, 8, 2, 2, 4)
    mask = np.arange(8)[None, :] <= (np.arange(3)[:, None] + 5)
    got = lnn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(
        np.asarray(got), reference_attention(q, k, v, mask[None, None]), atol=1e-5
    )


def test_bias_is_added_to_logits():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 2, 5, 6, 4, 4, 8)
    bias = rng.standard_normal((1, 4, 5, 6)).astype(np.float32)
    got = lnn.dot_product_attention(q, k, v, bias=bias)
    np.testing.assert_allclose(np.asarray(got), reference_attention(q, k, v, bias=bias), atol=1e-5)


def test_fully_masked_rows_are_finite():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 2, 4, 5, 2, 1, 8)
    mask = np.ones((2, 1, 4, 5), bool)
    mask[0, :, 1, :] = False  # query 1 of example 0 may attend nothing
    mask[1] = False  # example 1 attends nothing at all
    out = np.asarray(lnn.dot_product_attention(q, k, v, mask=mask))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=1e-5)
    g = jax.grad(lambda q: lnn.dot_product_attention(q, k, v, mask=mask).sum())(q)
    assert np.all(np.isfinite(np.asarray(g)))


def test_bfloat16_inputs_use_float32_softmax():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 2, 16, 16, 4, 4, 32)
    got = lnn.dot_product_attention(
        *(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), is_causal=True
    )
    assert got.dtype == jnp.bfloat16
    ref = reference_attention(q, k, v, np.tril(np.ones((16, 16), bool))[None, None])
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=5e-2)


def test_dropout():
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, 2, 8, 8, 2, 2, 8)
    base = lnn.dot_product_attention(q, k, v)
    same = lnn.dot_product_attention(q, k, v, dropout_rate=0.0, dropout_rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(same))
    a = lnn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0))
    b = lnn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0))
    c = lnn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="dropout_rng"):
        lnn.dot_product_attention(q, k, v, dropout_rate=0.1)


def test_rejects_bad_shapes_and_implementations():
    q = np.zeros((1, 2, 3, 4), np.float32)
    k = np.zeros((1, 2, 2, 4), np.float32)
    with pytest.raises(ValueError, match="must divide"):
        lnn.dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="accepted"):
        lnn.dot_product_attention(q, q, q, implementation="magic")


def _mha(**kw):
    return lnn.MultiHeadAttention(num_heads=4, **kw)


def test_mha_projections_match_einsum_reference():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    m = _mha(num_kv_heads=2)
    params = m.init(jax.random.key(1), x, deterministic=True)["params"]
    p = jax.tree.map(np.asarray, lnn.unbox(params))
    xn = np.asarray(x, np.float64)
    q = np.einsum("btd,dnh->btnh", xn, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("btd,dnh->btnh", xn, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("btd,dnh->btnh", xn, p["value"]["kernel"]) + p["value"]["bias"]
    o = reference_attention(q, k, v)
    want = np.einsum("btnh,nhd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]
    got = m.apply({"params": params}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert p["key"]["kernel"].shape == (16, 2, 4)


def test_gqa_with_all_kv_heads_equals_mha():
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    mha, gqa = _mha(), _mha(num_kv_heads=4)
    params = mha.init(jax.random.key(1), x, deterministic=True)
    np.testing.assert_array_equal(
        np.asarray(mha.apply(params, x, deterministic=True, is_causal=True)),
        np.asarray(gqa.apply(params, x, deterministic=True, is_causal=True)),
    )


def test_mqa_equals_mha_with_shared_kv_heads():
    """MQA (1 kv head) equals MHA whose per-head k/v projections are all copies of that head."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    mqa = _mha(num_kv_heads=1)
    p = lnn.unbox(mqa.init(jax.random.key(1), x, deterministic=True)["params"])
    tiled = dict(p)
    for name in ("key", "value"):
        tiled[name] = {
            "kernel": jnp.repeat(p[name]["kernel"], 4, axis=1),
            "bias": jnp.repeat(p[name]["bias"], 4, axis=0),
        }
    np.testing.assert_allclose(
        np.asarray(mqa.apply({"params": p}, x, deterministic=True)),
        np.asarray(_mha().apply({"params": tiled}, x, deterministic=True)),
        atol=1e-6,
    )


def test_cross_attention_masks_context_padding():
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 16))
    m = _mha()
    params = m.init(jax.random.key(2), x, ctx, deterministic=True)
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = m.apply(params, x, ctx, mask=lnn.padding_mask(valid), deterministic=True)
    ctx2 = ctx.at[0, 3:].set(100.0)  # change only padded context positions of example 0
    out2 = m.apply(params, x, ctx2, mask=lnn.padding_mask(valid), deterministic=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out2), atol=1e-6)


def test_kv_cache_decoding_equals_full_forward():
    T = 7
    x = jax.random.normal(jax.random.key(0), (2, T, 16))
    m = _mha(num_kv_heads=2, rope_base=10000.0)
    params = m.init(jax.random.key(1), x, deterministic=True)["params"]
    full = m.apply({"params": params}, x, is_causal=True, deterministic=True)
    cache = m.init(jax.random.key(1), x, deterministic=True, decode=True)["cache"]
    cache = jax.tree.map(jnp.zeros_like, cache)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    # Prefill three positions at once, then one at a time.
    out, mut = m.apply(
        {"params": params, "cache": cache},
        x[:, :3],
        positions=pos[:, :3],
        is_causal=True,
        deterministic=True,
        decode=True,
        mutable=["cache"],
    )
    outs = [out]
    cache = mut["cache"]
    for t in range(3, T):
        out, mut = m.apply(
            {"params": params, "cache": cache},
            x[:, t : t + 1],
            positions=pos[:, t : t + 1],
            is_causal=True,
            deterministic=True,
            decode=True,
            mutable=["cache"],
        )
        cache = mut["cache"]
        outs.append(out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-5)
