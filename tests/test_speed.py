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
from lmflax.train import Trainer


def test_fused_qkv_keeps_parameters_and_outputs():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 32)), jnp.float32)
    plain = lnn.MultiHeadAttention(num_heads=4)
    fused = lnn.MultiHeadAttention(num_heads=4, fused_qkv=True)

    @jax.jit
    def both(rng):
        p_plain = plain.init(rng, x, deterministic=True)
        p_fused = fused.init(rng, x, deterministic=True)
        params = lnn.unbox(p_plain)
        outs = [m.apply(params, x, is_causal=True, deterministic=True) for m in (plain, fused)]
        return p_plain, p_fused, outs

    p_plain, p_fused, (out_plain, out_fused) = both(jax.random.key(0))
    # Same tree, same logical axes, same initial values; the same function.
    assert jax.tree.structure(p_plain) == jax.tree.structure(p_fused)
    assert nn.get_partition_spec(p_plain) == nn.get_partition_spec(p_fused)
    for a, b in zip(jax.tree.leaves(lnn.unbox(p_plain)), jax.tree.leaves(lnn.unbox(p_fused))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(out_fused), np.asarray(out_plain), atol=1e-5)


def _row_scatters(model, ids, positions):
    """Scatter-adds over all B·T rows (index_vector_dim 2) in the gradient of model's output."""
    shapes = jax.eval_shape(lambda r: model.init(r, ids, deterministic=True), jax.random.key(0))
    f = jax.grad(lambda p: model.apply(p, ids, positions=positions, deterministic=True).sum())
    lines = jax.jit(f).lower(lnn.unbox(shapes)).as_text().splitlines()
    return sum("stablehlo.scatter<" in s and "index_vector_dim = 2" in s for s in lines)


def test_default_positions_are_one_lookup():
    """Without explicit positions the learned table is read once for all rows: in the gradient
    only the token embedding is a scatter-add over all B·T rows (the position table's is over T
    rows); with positions given per row there are two."""
    ids = jnp.zeros((2, 8), jnp.int32)
    explicit = jnp.broadcast_to(jnp.arange(8), (2, 8))
    small = dict(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=64)
    for model in (
        GPT(dataclasses.replace(PRESETS["gpt_tiny"], **small)),
        BertForMaskedLM(dataclasses.replace(PRESETS["bert_tiny"], **small)),
    ):
        assert _row_scatters(model, ids, None) == 1
        assert _row_scatters(model, ids, explicit) == 2


def test_bf16_compute_keeps_float32_master_weights_and_optimizer_state():
    cfg = Config(model=dataclasses.replace(PRESETS["gpt_tiny"], dtype="bfloat16"))
    cfg = override(cfg, {"data.batch_size": 2, "data.seq_len": 16})
    trainer = Trainer.create(cfg, init=False)
    state = trainer.abstract_state
    dtypes = {x.dtype for x in jax.tree.leaves(state["params"])}
    opt_dtypes = {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert opt_dtypes == {jnp.dtype(jnp.float32)}
