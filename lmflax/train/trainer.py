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
from lmflax.models import lora
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
    lora_plan: lora.LoraPlan | None = None
    base_shardings: Any = None  # the model's parameter tree's shardings (with LoRA)
    build_fn: Any = None  # (rng, base params) -> the state's arrays, boxed

    @classmethod
    def create(
        cls,
        cfg: Config,
        *,
        init: bool = True,
        devices: Sequence[jax.Device] | None = None,
        need_weights: bool = True,
    ) -> Trainer:
        """Builds the task, mesh and train state: freshly initialised and sharded if `init`,
        else abstract (ShapeDtypeStructs; restore a checkpoint or call `initialize`).

        devices: the mesh's devices (default all, over every process); the planner passes the
        devices of a TPU topology description to compile for a slice it does not have.
        The config is resolved first (`lmflax.train.resolve`; once per distinct config);
        need_weights=False (with init=False) lets a model.init_from checkpoint lack its weight
        files, for planning.
        """
        if init and not need_weights:
            raise ValueError("Trainer.create(init=True) reads the init_from weights: need_weights")
        cfg = resolve(cfg, need_weights=need_weights)
        devices = list(jax.devices() if devices is None else devices)
        validate_devices(cfg, len(devices))
        task = make_task(cfg)
        mesh = make_mesh(cfg.mesh, devices)
        rules = list(cfg.mesh.rules)
        tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        dummy = task.dummy_batch(dp)

        init_rng = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)
        lora_cfg = getattr(cfg.model, "lora", None)
        plan, base_shardings = None, None
        if lora_cfg is not None and lora_cfg.enabled:
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                base_boxed = jax.eval_shape(lambda r: task.init(r, dummy)["params"], init_rng)
            plan = lora.make_plan(base_boxed, lora_cfg, cfg.model.param_dtype)
            base_shardings = logical_shardings(base_boxed, mesh, rules)

        def build(rng: jax.Array, base: Any) -> dict[str, Any]:
            """The train state's arrays (boxed) around the base model's parameters."""
            if plan is None:
                params = base
                return {
                    "step": jnp.zeros((), jnp.int32),
                    "params": params,
                    "opt_state": tx.init(params),
                }
            adapters = lora.init_adapters(plan, jax.random.fold_in(rng, 1))
            return {
                "step": jnp.zeros((), jnp.int32),
                "params": adapters,
                "opt_state": tx.init(adapters),
                "frozen": lora.freeze(plan, base),
            }

        def init_fn(rng: jax.Array) -> dict[str, Any]:
            return build(rng, task.init(rng, dummy)["params"])

        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(init_fn, init_rng)
        shardings = logical_shardings(boxed, mesh, rules)
        abstract = unbox(boxed)
        merge_fn = None
        if plan is not None:

            def merge_fn(frozen: Any, params: Any, rng: Any, deterministic: bool) -> Any:
                return lora.merge(plan, frozen, params, rng, deterministic)

        state = TrainState(
            step=abstract["step"],
            params=abstract["params"],
            opt_state=abstract["opt_state"],
            tx=tx,
            loss_fn=task.loss,
            schedule=schedule,
            grad_accum_steps=cfg.optimizer.grad_accum_steps,
            frozen=abstract.get("frozen"),
            model_params_fn=merge_fn,
            # A base read from model.init_from is read again on resume (checkpoints hold only
            # the adapters); a random base is part of the run and is saved with it.
            save_frozen=not cfg.model.init_from,
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
            lora_plan=plan,
            base_shardings=base_shardings,
            build_fn=build,
        )
        if init:
            trainer.state = trainer.initialize()
        return trainer

    def initialize(self) -> TrainState:
        """A fresh train state, created directly in its shardings (never whole on one device).

        With `model.init_from='hf:DIR'` the parameters then take the checkpoint's values."""
        shardings = self.all_shardings()
        if self.lora_plan is not None and self.cfg.model.init_from:
            # The base is initialised, takes the checkpoint's values, then is frozen (stored
            # as model.lora.base_dtype) next to fresh adapters.
            task, dummy = self.task, self.task.dummy_batch(self._dp())
            with self.context():
                base = jax.jit(
                    lambda r: nn.meta.unbox(task.init(r, dummy)["params"]),
                    out_shardings=self.base_shardings,
                )(self.init_rng)
            base = init_params(self.cfg.model, base, self.base_shardings)
            with self.context():
                arrays = jax.jit(
                    lambda r, b: nn.meta.unbox(self.build_fn(r, b)), out_shardings=shardings
                )(self.init_rng, base)
            return self.state.with_arrays(arrays)
        with self.context():
            arrays = jax.jit(lambda r: nn.meta.unbox(self.init_fn(r)), out_shardings=shardings)(
                self.init_rng
            )
        if self.cfg.model.init_from:
            arrays["params"] = init_params(self.cfg.model, arrays["params"], shardings["params"])
        return self.state.with_arrays(arrays)

    def _dp(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def all_shardings(self) -> dict[str, Any]:
        """The shardings of every array of the state ({'step', 'params', 'opt_state'} and, with
        LoRA, 'frozen'), whether or not a checkpoint holds it."""
        out = self.state_shardings.arrays()
        if self.state_shardings.frozen is not None:
            out["frozen"] = self.state_shardings.frozen
        return out

    def restored(self, arrays: dict[str, Any]) -> TrainState:
        """The state from a checkpoint's arrays; a LoRA base the checkpoint does not hold (it
        came from model.init_from) is read from there again."""
        state = self.state.with_arrays(arrays)
        if state.frozen is not None and "frozen" not in arrays:
            state = state.replace(frozen=self.initialize().frozen)
        return state

    def model_params(self, state: TrainState) -> Any:
        """The model's parameters (LoRA merged into the base), sharded like the model's."""
        if state.model_params_fn is None:
            return state.params
        if "_merge" not in self.__dict__:
            self.__dict__["_merge"] = jax.jit(
                lambda s: s.model_params(), out_shardings=self.base_shardings
            )
        with self.context():
            return self.__dict__["_merge"](state)

    def model_param_shardings(self) -> Any:
        """The shardings of `model_params`'s tree."""
        return self.base_shardings if self.lora_plan is not None else self.state_shardings.params

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
        shardings = self.state_shardings.arrays()
        shapes = {k: v for k, v in self.abstract_state.items() if k in shardings}
        return abstract_with_shardings(shapes, shardings)

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
