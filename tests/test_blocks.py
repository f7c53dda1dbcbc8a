"""Encoder/decoder stacks: causality, padding invariance, scan == unrolled, remat, cross-attention."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmflax import nn as lnn

from .conftest import jitted

CFG = lnn.StackConfig(
    num_layers=3,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    d_ff=64,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
)


def _x(B=2, T=8, D=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, D))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_decoder_is_causal(norm_position):
    cfg = dataclasses.replace(CFG, norm_position=norm_position, rope_base=10000.0)
    dec = lnn.Decoder(cfg)
    x = _x()
    params = jitted(dec, "init")(jax.random.key(1), x, deterministic=True)
    y = jitted(dec)(params, x, deterministic=True)
    t = 4
    x2 = x.at[:, t:].set(jax.random.normal(jax.random.key(9), x[:, t:].shape))
    y2 = jitted(dec)(params, x2, deterministic=True)
    np.testing.assert_allclose(np.asarray(y[:, :t]), np.asarray(y2[:, :t]), atol=1e-5)
    assert not np.allclose(np.asarray(y[:, t:]), np.asarray(y2[:, t:]))


def test_encoder_padding_invariance():
    enc = lnn.Encoder(dataclasses.replace(CFG, norm_position="post"))
    x = _x(B=1, T=5)
    params = jitted(enc, "init")(jax.random.key(1), x, deterministic=True)
    y = jitted(enc)(params, x, deterministic=True)
    padded = jnp.concatenate([x, jax.random.normal(jax.random.key(3), (1, 4, 32)) * 10], axis=1)
    valid = jnp.array([[1] * 5 + [0] * 4])
    y_pad = jitted(enc)(params, padded, mask=lnn.padding_mask(valid), deterministic=True)
    np.testing.assert_allclose(np.asarray(y_pad[:, :5]), np.asarray(y), atol=1e-5)


def test_encoder_is_bidirectional():
    enc = lnn.Encoder(CFG)
    x = _x()
    params = jitted(enc, "init")(jax.random.key(1), x, deterministic=True)
    y = jitted(enc)(params, x, deterministic=True)
    # (a random change: adding a constant to every feature is erased by the pre-norm)
    y2 = jitted(enc)(params, x.at[:, -1].set(_x(T=1, seed=7)[:, 0]), deterministic=True)
    assert not np.allclose(np.asarray(y[:, 0]), np.asarray(y2[:, 0]))


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_scanned_equals_unrolled(stack):
    cls = lnn.Encoder if stack == "encoder" else lnn.Decoder
    x = _x()
    unrolled = cls(CFG)
    scanned = cls(dataclasses.replace(CFG, scan_layers=True))
    p_un = lnn.unbox(jitted(unrolled, "init")(jax.random.key(1), x, deterministic=True))
    p_sc = lnn.stack_layers(p_un)
    shapes = jax.tree.map(
        jnp.shape, lnn.unbox(jitted(scanned, "init")(jax.random.key(1), x, deterministic=True))
    )
    assert jax.tree.map(jnp.shape, p_sc) == shapes
    np.testing.assert_allclose(
        np.asarray(jitted(scanned)(p_sc, x, deterministic=True)),
        np.asarray(jitted(unrolled)(p_un, x, deterministic=True)),
        atol=1e-5,
    )
    back = lnn.unstack_layers(p_sc)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, p_un))


@pytest.mark.parametrize("remat", ["full", "minimal", "save_dots", "nothing_saveable"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_keeps_values_and_gradients(remat, scan):
    x = _x()
    base = lnn.Decoder(dataclasses.replace(CFG, scan_layers=scan))
    rem = lnn.Decoder(dataclasses.replace(CFG, scan_layers=scan, remat=remat))
    params = jitted(base, "init")(jax.random.key(1), x, deterministic=True)

    def loss(m, p):
        return jnp.sum(m.apply(p, x, deterministic=True) ** 2)

    # Each gradient one compiled program (grad of a jitted apply compiles a forward, a
    # linearised and a transposed program).
    g0 = jax.jit(jax.grad(lambda p: loss(base, p)))(params)
    g1 = jax.jit(jax.grad(lambda p: loss(rem, p)))(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
        g0,
        g1,
    )


def test_unknown_remat_policy():
    with pytest.raises(ValueError, match="remat"):
        lnn.remat_policy("sometimes")


def test_decoder_with_cross_attention_uses_encoder_output_and_mask():
    dec = lnn.Decoder(CFG)
    x, enc = _x(T=4), _x(T=6, seed=5)
    valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    cross_mask = lnn.padding_mask(valid)
    params = jitted(dec, "init")(
        jax.random.key(1), x, encoded=enc, cross_mask=cross_mask, deterministic=True
    )
    assert "cross_attention" in params["params"]["layers_0"]
    y = jitted(dec)(params, x, encoded=enc, cross_mask=cross_mask, deterministic=True)
    y_other = jitted(dec)(
        params,
        x,
        encoded=enc.at[1].set(_x(B=1, T=6, seed=8)[0]),
        cross_mask=cross_mask,
        deterministic=True,
    )
    y_pad = jitted(dec)(
        params, x, encoded=enc.at[0, 4:].add(50.0), cross_mask=cross_mask, deterministic=True
    )
    np.testing.assert_allclose(np.asarray(y_pad), np.asarray(y), atol=1e-5)
    assert not np.allclose(np.asarray(y_other[1]), np.asarray(y[1]))


def test_dropout_is_active_only_when_not_deterministic():
    cfg = dataclasses.replace(CFG, dropout_rate=0.5, attention_dropout_rate=0.5, scan_layers=True)
    dec = lnn.Decoder(cfg)
    x = _x()
    params = jitted(dec, "init")(jax.random.key(1), x, deterministic=True)
    det = jitted(dec)(params, x, deterministic=True)
    a = jitted(dec)(params, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    b = jitted(dec)(params, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(det))
