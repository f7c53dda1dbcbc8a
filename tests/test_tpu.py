"""The TPU path without a TPU: the full sharded train step, with splash attention picked by the
dispatch and run inside shard_map, compiled ahead of time for a TPU topology (libtpu)."""

from __future__ import annotations

import dataclasses
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from lmflax.config import Config, override
from lmflax.core.optim import make_optimizer
from lmflax.core.state import TrainState
from lmflax.core.step import train_step
from lmflax.models import PRESETS
from lmflax.parallel import batch_sharding, logical_shardings, make_mesh, unbox
from lmflax.tasks import make_task
from lmflax.train import resolve

# libtpu takes a process lock (/tmp/libtpu_lockfile) when it loads; another process using it at
# the same time (a parallel test run, the planner) must not make this test fail.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def test_sharded_train_step_with_splash_attention_compiles_for_tpu(caplog):
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    model = dataclasses.replace(
        PRESETS["gpt_tiny"], num_layers=1, d_model=256, num_heads=4, d_ff=256, dtype="bfloat16"
    )
    cfg = override(
        Config(model=model),
        {"data.batch_size": 4, "data.seq_len": 256, "mesh.data": 2, "mesh.tensor": 2},
    )
    cfg = resolve(cfg)
    task = make_task(cfg)
    mesh = make_mesh(cfg.mesh, devices=devices)
    rules = list(cfg.mesh.rules)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    dummy = task.dummy_batch(cfg.data.batch_size)

    def init(rng):
        params = task.init(rng, dummy)["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init, key)
    shardings = logical_shardings(boxed, mesh, rules)
    arrays = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unbox(boxed), shardings
    )
    state = TrainState(
        step=arrays["step"],
        params=arrays["params"],
        opt_state=arrays["opt_state"],
        tx=tx,
        loss_fn=task.loss,
        schedule=schedule,
    )
    state_shardings = state.replace(
        step=shardings["step"], params=shardings["params"], opt_state=shardings["opt_state"]
    )
    rows = batch_sharding(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in dummy.items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    step = jax.jit(
        train_step,
        in_shardings=(state_shardings, rows, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    with (
        caplog.at_level(logging.DEBUG, logger="lmflax.attention"),
        jax.set_mesh(mesh),
        nn.logical_axis_rules(rules),
    ):
        compiled = step.lower(state, batch, key).compile()
    assert "attention: splash" in caplog.text  # the dispatch chose the TPU kernel itself
    assert "not " not in caplog.text.split("attention: splash")[1].split("\n")[0]
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # the Mosaic kernel is in the compiled program
    assert compiled.memory_analysis().temp_size_in_bytes > 0
