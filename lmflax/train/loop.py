"""The training loop: the only place that touches disk, clocks and logs.

run(config, workdir): validate -> build task/model/data -> mesh and shardings -> init or restore
-> jit(train_step) with explicit shardings and donated state -> loop (log, evaluate, checkpoint)
-> final checkpoint, evaluation and a generated sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmflax import config as config_lib
from lmflax.config import Config, ConfigError
from lmflax.parallel import batch_sharding, logical_shardings, make_mesh, unbox
from lmflax.tasks import Task, make_task
from lmflax.train.checkpoint import Checkpointer, abstract_with_shardings
from lmflax.train.losses import finalize
from lmflax.train.metrics import MetricWriter, Progress
from lmflax.train.optim import make_optimizer
from lmflax.train.state import TrainState
from lmflax.train.step import eval_step, train_step

log = logging.getLogger("lmflax")


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
    def create(cls, cfg: Config, *, init: bool = True) -> Trainer:
        """Builds the task, mesh and train state: freshly initialised and sharded if `init`,
        else abstract (ShapeDtypeStructs; restore a checkpoint or call `initialize`)."""
        config_lib.validate(cfg)
        config_lib.validate_devices(cfg, jax.device_count())
        task = make_task(cfg)
        mesh = make_mesh(cfg.mesh)
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
        """A fresh train state, created directly in its shardings (never whole on one device)."""
        shardings = self.state_shardings.arrays()
        with self.context():
            arrays = jax.jit(lambda r: nn.meta.unbox(self.init_fn(r)), out_shardings=shardings)(
                self.init_rng
            )
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


def _prepare_workdir(workdir: Path, cfg: Config, is_writer: bool) -> None:
    """Creates the workdir, proves it writable, and records the config. A workdir that holds a
    run of a different model or task is refused rather than silently mixed."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"workdir {workdir} is not writable: {e}") from None
    saved = workdir / "config.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        new = config_lib.to_dict(cfg)
        for section in ("model", "task"):
            if old.get(section) != new[section]:
                diff = sorted(
                    k
                    for k in set(old.get(section, {})) | set(new[section])
                    if old.get(section, {}).get(k) != new[section].get(k)
                )
                raise ConfigError(
                    f"workdir {workdir} holds a run with a different {section} config "
                    f"(differing keys: {', '.join(diff)}); use another --workdir or the same config"
                )
    if is_writer:
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(config_lib.to_json(cfg))
        tmp.replace(saved)


def evaluate(
    trainer: Trainer, state: TrainState, split: str, steps: int, eval_fn: Any
) -> dict[str, float]:
    """Exact metrics over the first `steps` batches of `split` (the same batches every time)."""
    cfg = trainer.cfg
    ds = trainer.task.dataset(
        split,
        seed=cfg.train.seed,
        batch_size=cfg.data.batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    it = iter(ds)
    total = None
    for _ in range(steps):
        m = eval_fn(state, trainer.global_batch(next(it)))
        total = m if total is None else jax.tree.map(jnp.add, total, m)
    _close(it)
    return finalize(jax.device_get(total))


def _close(it: Any) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def run(cfg: Config, workdir: str | Path, *, config_name: str = "config") -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns a summary of what happened."""
    workdir = Path(workdir)
    config_lib.validate(cfg)
    config_lib.validate_devices(cfg, jax.device_count())
    is_writer = jax.process_index() == 0
    _prepare_workdir(workdir, cfg, is_writer)
    t = cfg.train

    trainer = Trainer.create(cfg, init=False)
    task = trainer.task
    log.info(
        "tokenizer: %d tokens; model: %s", task.tokenizer.vocab_size, type(task.model).__name__
    )
    if cfg.data.eval_split:
        # Fail now, not after hours of training, if the evaluation split is missing.
        from lmflax.data import sources

        sources.data_source(
            cfg.data.dataset, cfg.data.eval_split, cfg.data.data_dir, download=cfg.data.download
        )

    ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
    per_process = cfg.data.batch_size // jax.process_count()
    train_iter = iter(
        task.dataset(
            cfg.data.train_split,
            seed=t.seed,
            batch_size=per_process,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )
    latest = ckpt.latest_step()
    meta = None
    with trainer.context():
        if latest is not None:
            arrays, meta = ckpt.restore(latest, trainer.abstract_for_restore(), train_iter)
            state = trainer.state.with_arrays(arrays)
            log.info("resumed from %s at step %d", ckpt.directory, latest)
        else:
            state = trainer.initialize()
            log.info("initialised a new run in %s", workdir)
    start = int(jax.device_get(state.step))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log.info(
        "%s: %s parameters, mesh %s, %d devices, steps %d -> %d",
        config_name,
        f"{n_params:,}",
        dict(trainer.mesh.shape),
        jax.device_count(),
        start,
        t.steps,
    )

    writer = MetricWriter(workdir, enabled=is_writer)
    writer.truncate_after(start)
    progress = Progress(t.steps, start, enabled=is_writer and t.progress)
    step_fn = trainer.jit_train_step()
    eval_fn = trainer.jit_eval_step()
    dropout_key = jax.random.fold_in(jax.random.key(t.seed), 1)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    summary: dict[str, Any] = {"start_step": start, "workdir": str(workdir), "params": n_params}
    last_saved = latest
    # Logged values average the steps since the last log. The partial window is saved with each
    # checkpoint, so a resumed run logs exactly what an uninterrupted one would.
    window, window_steps = _restore_window(meta)
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    try:
        with trainer.context():
            t_last = time.perf_counter()
            timed_steps = 0
            for step in range(start, t.steps):
                batch = trainer.global_batch(next(train_iter))
                state, metrics = step_fn(state, batch, jax.random.fold_in(dropout_key, step))
                window = metrics if window is None else add(window, metrics)
                done, window_steps, timed_steps = step + 1, window_steps + 1, timed_steps + 1
                if done % t.log_every == 0 or done == t.steps:
                    values = finalize(jax.device_get(window))
                    values["learning_rate"] = float(state.schedule(step))
                    now = time.perf_counter()
                    values["tokens_per_sec"] = timed_steps * tokens_per_step / (now - t_last)
                    t_last, timed_steps = now, 0
                    window, window_steps = None, 0
                    writer.write(done, values)
                    progress.update(done, values["loss"], values["tokens_per_sec"])
                    summary["final_loss"] = values["loss"]
                if (
                    t.eval_every
                    and done % t.eval_every == 0
                    and done != t.steps
                    and cfg.data.eval_split
                ):
                    ev = evaluate(trainer, state, cfg.data.eval_split, t.eval_steps, eval_fn)
                    writer.write(done, ev, file="eval_metrics", prefix="eval/")
                if t.checkpoint_every and done % t.checkpoint_every == 0 and done != t.steps:
                    ckpt.save(
                        done,
                        state.arrays(),
                        train_iter,
                        _meta(done, config_name, window, window_steps),
                    )
                    last_saved = done
            progress.close()
            if last_saved != t.steps and start < t.steps:
                ckpt.save(
                    t.steps,
                    state.arrays(),
                    train_iter,
                    _meta(t.steps, config_name, None, 0),
                    force=True,
                )
            ckpt.wait()
            if start >= t.steps:
                log.info(
                    "run already complete at step %d (train.steps=%d); nothing to do",
                    start,
                    t.steps,
                )
            if cfg.data.eval_split:
                ev = evaluate(trainer, state, cfg.data.eval_split, t.eval_steps, eval_fn)
                summary["eval"] = ev
                if start < t.steps:
                    writer.write(t.steps, ev, file="eval_metrics", prefix="eval/")
                log.info("eval on %s: %s", cfg.data.eval_split, _fmt(ev))
            generated = task.evaluate_generation(
                state.params, jax.random.fold_in(jax.random.key(t.seed), 3)
            )
            if generated is not None:
                gen_metrics, predictions = generated
                summary["generation"] = gen_metrics
                if start < t.steps:
                    writer.write(t.steps, gen_metrics, file="eval_metrics", prefix="eval/")
                if is_writer:
                    _write_jsonl(workdir / "predictions.jsonl", predictions)
                log.info("generated on %s: %s", cfg.data.eval_split, _fmt(gen_metrics))
            sample = task.sample(state.params, jax.random.fold_in(jax.random.key(t.seed), 2))
            if sample is not None:
                summary["sample"] = sample
    finally:
        _close(train_iter)
        ckpt.close()
        writer.close()
    summary["final_step"] = int(jax.device_get(state.step))
    if is_writer:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)


def _meta(step: int, config_name: str, window: Any, window_steps: int) -> dict[str, Any]:
    """Checkpoint metadata, with the metric sums of the not-yet-logged steps."""
    sums = None
    if window is not None:
        sums = {k: [float(v) for v in pair] for k, pair in jax.device_get(window).items()}
    return {"step": step, "config": config_name, "window": sums, "window_steps": window_steps}


def _restore_window(meta: dict[str, Any] | None) -> tuple[Any, int]:
    if not meta or not meta.get("window"):
        return None, 0
    # float32 -> Python float -> float32 is exact, so the resumed sums are bit-identical.
    window = {
        k: tuple(jnp.asarray(v, jnp.float32) for v in pair) for k, pair in meta["window"].items()
    }
    return window, int(meta.get("window_steps", 0))


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())
