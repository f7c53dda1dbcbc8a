"""Evaluation: `evaluate` (what the loop and `lmflax eval` report), the exact whole-split
evaluation of fine-tuning tasks (`evaluate_split`), and `format_table` for printing metrics.

Exactness: device metrics come out of the jitted step as sums over the global batch (already
summed over every device and host); host metrics (entities, answers) are counts per process,
summed over processes with an all-gather. Padding rows that fill the last batch carry weight 0.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lmflax.config import ConfigError
from lmflax.core.losses import finalize
from lmflax.core.state import TrainState
from lmflax.tasks.finetune import FinetuneTask
from lmflax.train.trainer import Trainer

log = logging.getLogger("lmflax")


def _sum_over_processes(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if jax.process_count() == 1:
        return counts
    return {
        k: np.asarray(multihost_utils.process_allgather(np.asarray(v))).sum(axis=0)
        for k, v in counts.items()
    }


@jax.jit
def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _eval_outputs_fn(trainer: Any) -> Any:
    """task.eval_outputs jitted with the trainer's shardings: params as trained, batch over the
    batch axes; sums replicated, predictions sharded like the batch. Built once per trainer."""
    cache = trainer.task.__dict__.setdefault("_jitted_eval_outputs", {})
    key = id(trainer.mesh)
    if key not in cache:
        replicated = NamedSharding(trainer.mesh, PartitionSpec())
        cache[key] = jax.jit(
            trainer.task.eval_outputs,
            in_shardings=(trainer.model_param_shardings(), trainer.batch_sharding),
            out_shardings=(replicated, trainer.batch_sharding),
        )
    return cache[key]


def evaluate_split(
    trainer: Trainer, state: TrainState, split: str, max_batches: int
) -> dict[str, float]:
    """Metrics of an `exact_eval` task over `split` once (or its first max_batches batches)."""
    task: FinetuneTask = trainer.task
    cfg = trainer.cfg
    per_process = cfg.data.batch_size // jax.process_count()
    rows = task.eval_features(
        split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        limit=max_batches * per_process,
    )
    local_batches = math.ceil(len(rows) / per_process)
    # Every process must run the same number of (collective) steps; short shares pad.
    batches = local_batches
    if jax.process_count() > 1:
        batches = int(
            np.asarray(multihost_utils.process_allgather(np.asarray(local_batches))).max()
        )
    batches = min(batches, max_batches)
    fn = _eval_outputs_fn(trainer)
    batch_spec = trainer.batch_sharding.spec
    collector = task.collector()
    sums = None
    params = trainer.model_params(state)
    for b in range(batches):
        chunk = rows[b * per_process : (b + 1) * per_process]
        batch = trainer.global_batch(task.collate(chunk, per_process))
        device_sums, predictions = fn(params, batch)
        sums = device_sums if sums is None else _add(sums, device_sums)
        local = multihost_utils.global_array_to_host_local_array(
            predictions, trainer.mesh, batch_spec
        )
        collector.add(chunk, {k: np.asarray(v)[: len(chunk)] for k, v in local.items()})
    if sums is None:
        raise ConfigError(
            f"evaluation split {split!r} of {cfg.data.dataset!r} gave no batches "
            f"(train.eval_steps={max_batches})"
        )
    counts = _sum_over_processes(collector.counts())
    return task.finish(jax.device_get(sums), counts)


# ---------------------------------------------------------------------------------------------
# Any task


def evaluate(
    trainer: Trainer,
    state: TrainState,
    split: str,
    steps: int,
    eval_fn: Any,
    num_shards: int | None = None,
) -> dict[str, float]:
    """Exact metrics over the first `steps` batches of `split` (the same batches every time).

    Tasks with `exact_eval` (fine-tuning) evaluate the split once (at most `steps` batches)
    with their own metrics (`evaluate_split`)."""
    if trainer.task.exact_eval:
        return evaluate_split(trainer, state, split, steps)
    it = trainer.batches(split, num_shards)
    total = None
    try:
        for _ in range(steps):
            m = eval_fn(state, trainer.global_batch(next(it)))
            total = m if total is None else jax.tree.map(jnp.add, total, m)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return finalize(jax.device_get(total))


def format_table(values: dict[str, float], title: str) -> str:
    """A two-column text table of metric values."""
    width = max([len("metric"), *(len(k) for k in values)])
    lines = [title, f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    for k, v in values.items():
        lines.append(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)
