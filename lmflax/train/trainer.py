"""`Trainer`: everything built from a config before the first step (task, mesh, shardings, the
abstract or initialised train state, the jitted steps). Usable without the loop: tests,
benchmarks, the planner, evaluation and `Run.open` build one."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmflax.config import Config
from lmflax.core.optim import make_optimizer
from lmflax.core.state import TrainState
from lmflax.core.step import eval_step, train_step
from lmflax.data import shards
from lmflax.hf import init_params
from lmflax.parallel import (
    batch_sharding,
    logical_shardings,
    make_mesh,
    unbox,
    validate_devices,
)
from lmflax.tasks import Task, make_task
from lmflax.train.checkpoint import abstract_with_shardings
from lmflax.train.checks import resolve


@dataclasses.dataclass
class Trainer:
    """Everything built from a config before the first step; usable without the loop (tests,
    benchmarks, the planner)."""

    cfg: Config
    task: Task
    mesh: jax.sharding.Mesh
    state: TrainState
    state_shardings: Any
    abstract_state: Any
    batch_sharding: NamedSharding
    init_fn: Any
    init_rng: jax.Array

    @classmethod
    def create(
        cls, cfg: Config, *, init: bool = True, devices: Sequence[jax.Device] | None = None
    ) -> Trainer:
        """Builds the task, mesh and train state: freshly initialised and sharded if `init`,
        else abstract (ShapeDtypeStructs; restore a checkpoint or call `initialize`).

        devices: the mesh's devices (default all, over every process); the planner passes the
        devices of a TPU topology description to compile for a slice it does not have.
        The config is resolved first (`lmflax.train.resolve`; once per distinct config).
        """
        cfg = resolve(cfg)
        devices = list(jax.devices() if devices is None else devices)
        validate_devices(cfg, len(devices))
        task = make_task(cfg)
        mesh = make_mesh(cfg.mesh, devices)
        rules = list(cfg.mesh.rules)
        tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        dummy = task.dummy_batch(dp)

        def init_fn(rng: jax.Array) -> dict[str, Any]:
            params = task.init(rng, dummy)["params"]
            return {
                "step": jnp.zeros((), jnp.int32),
                "params": params,
                "opt_state": tx.init(params),
            }

        init_rng = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(init_fn, init_rng)
        shardings = logical_shardings(boxed, mesh, rules)
        abstract = unbox(boxed)
        state = TrainState(
            step=abstract["step"],
            params=abstract["params"],
            opt_state=abstract["opt_state"],
            tx=tx,
            loss_fn=task.loss,
            schedule=schedule,
            grad_accum_steps=cfg.optimizer.grad_accum_steps,
        )
        trainer = cls(
            cfg=cfg,
            task=task,
            mesh=mesh,
            state=state,
            state_shardings=state.with_arrays(shardings),
            abstract_state=abstract,
            batch_sharding=batch_sharding(mesh, rules),
            init_fn=init_fn,
            init_rng=init_rng,
        )
        if init:
            trainer.state = trainer.initialize()
        return trainer

    def initialize(self) -> TrainState:
        """A fresh train state, created directly in its shardings (never whole on one device).

        With `model.init_from='hf:DIR'` the parameters then take the checkpoint's values."""
        shardings = self.state_shardings.arrays()
        with self.context():
            arrays = jax.jit(lambda r: nn.meta.unbox(self.init_fn(r)), out_shardings=shardings)(
                self.init_rng
            )
        if self.cfg.model.init_from:
            arrays["params"] = init_params(self.cfg.model, arrays["params"], shardings["params"])
        return self.state.with_arrays(arrays)

    def context(self) -> contextlib.ExitStack:
        """The mesh and logical-axis rules that tracing the steps needs."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(list(self.cfg.mesh.rules)))
        return stack

    def jit_train_step(self) -> Any:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(
            train_step,
            in_shardings=(self.state_shardings, self.batch_sharding, replicated),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )

    def jit_eval_step(self) -> Any:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(
            eval_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=replicated,
        )

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> one global array per key, sharded over the batch axes."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()
        }

    def abstract_for_restore(self) -> Any:
        """The checkpoint's arrays as ShapeDtypeStructs carrying this mesh's shardings."""
        return abstract_with_shardings(self.abstract_state, self.state_shardings.arrays())

    def batches(self, split: str, num_shards: int | None = None) -> shards.ShardedBatches:
        """This process's rows of the global batches of `split`, read as `num_shards` data
        shards (default data.num_shards, or one per process)."""
        cfg = self.cfg
        return shards.for_task(
            self.task,
            split,
            seed=cfg.train.seed,
            sharding=self.batch_sharding,
            global_batch=cfg.data.batch_size,
            num_shards=num_shards or cfg.data.num_shards or jax.process_count(),
        )
