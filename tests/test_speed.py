"""Speed options change how a step is computed, never the parameters or the function: fused
q/k/v projection, position lookups, bf16 compute with float32 master weights and optimizer
state."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmflax import nn as lnn
from lmflax.config import Config, override
from lmflax.models import GPT, PRESETS, BertForMaskedLM
from lmflax.train.loop import Trainer


def test_fused_qkv_keeps_parameters_and_outputs():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 32)), jnp.float32)
    plain = lnn.MultiHeadAttention(num_heads=4)
    fused = lnn.MultiHeadAttention(num_heads=4, fused_qkv=True)
    init = lambda m: jax.jit(lambda r: m.init(r, x, deterministic=True))(jax.random.key(0))  # noqa: E731
    p_plain, p_fused = init(plain), init(fused)
    # Same tree, same logical axes, same initial values.
    assert jax.tree.structure(p_plain) == jax.tree.structure(p_fused)
    assert nn.get_partition_spec(p_plain) == nn.get_partition_spec(p_fused)
    for a, b in zip(jax.tree.leaves(lnn.unbox(p_plain)), jax.tree.leaves(lnn.unbox(p_fused))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params = lnn.unbox(p_plain)
    apply = lambda m: jax.jit(  # noqa: E731
        lambda p: m.apply(p, x, is_causal=True, deterministic=True)
    )(params)
    np.testing.assert_allclose(np.asarray(apply(fused)), np.asarray(apply(plain)), atol=1e-5)


def test_default_positions_are_one_lookup_with_the_same_result():
    """Without explicit positions the learned table is read once for all rows (its gradient is
    a sum, not a B-way scatter-add); explicit 0..T-1 positions give the same logits."""
    cfg = dataclasses.replace(
        PRESETS["gpt_tiny"], num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=64
    )
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
    model = GPT(cfg)
    params = jax.jit(lambda r: model.init(r, ids, deterministic=True))(jax.random.key(0))
    params = lnn.unbox(params)
    explicit = jnp.broadcast_to(jnp.arange(8), (2, 8))
    run = lambda p, pos: model.apply(p, ids, positions=pos, deterministic=True)  # noqa: E731
    default, given = jax.jit(lambda p: (run(p, None), run(p, explicit)))(params)
    np.testing.assert_allclose(np.asarray(default), np.asarray(given), atol=1e-6)
    # In the gradient, only the token embedding is a scatter-add over all B·T rows; the position
    # table's is over T rows (index_vector_dim 1), unless positions are given per row.
    bert = BertForMaskedLM(
        dataclasses.replace(PRESETS["bert_tiny"], num_layers=1, d_model=32, vocab_size=64)
    )
    p = lnn.unbox(jax.jit(lambda r: bert.init(r, ids, deterministic=True))(jax.random.key(0)))

    def row_scatters(pos):
        f = jax.grad(lambda p: bert.apply(p, ids, positions=pos, deterministic=True).sum())
        lines = jax.jit(f).lower(p).as_text().splitlines()
        return sum("stablehlo.scatter<" in s and "index_vector_dim = 2" in s for s in lines)

    assert row_scatters(None) == 1
    assert row_scatters(explicit) == 2


def test_bf16_compute_keeps_float32_master_weights_and_optimizer_state():
    cfg = Config(model=dataclasses.replace(PRESETS["gpt_tiny"], dtype="bfloat16"))
    cfg = override(cfg, {"data.batch_size": 2, "data.seq_len": 16})
    trainer = Trainer.create(cfg, init=False)
    state = trainer.abstract_state
    dtypes = {x.dtype for x in jax.tree.leaves(state["params"])}
    opt_dtypes = {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert opt_dtypes == {jnp.dtype(jnp.float32)}
