"""Evaluation beyond the training loop: exact whole-split evaluation of fine-tuning tasks, and
`--eval_only` (evaluate a workdir's newest checkpoint, or the parameters `Trainer.initialize`
makes, and print a metrics table).

Exactness: device metrics come out of the jitted step as sums over the global batch (already
summed over every device and host); host metrics (entities, answers) are counts per process,
summed over processes with an all-gather. Padding rows that fill the last batch carry weight 0.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lmflax import config as config_lib
from lmflax.config import Config, ConfigError
from lmflax.tasks.finetune import FinetuneTask
from lmflax.train.state import TrainState

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
            in_shardings=(trainer.state_shardings.params, trainer.batch_sharding),
            out_shardings=(replicated, trainer.batch_sharding),
        )
    return cache[key]


def evaluate_finetune(
    trainer: Any, state: TrainState, split: str, max_batches: int
) -> dict[str, float]:
    """Metrics of a fine-tuning task over `split` once (or its first max_batches batches)."""
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
    for b in range(batches):
        chunk = rows[b * per_process : (b + 1) * per_process]
        batch = trainer.global_batch(task.collate(chunk, per_process))
        device_sums, predictions = fn(state.params, batch)
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
# --eval_only


def load_config(
    config_spec: str | None, workdir: str | None, overrides: list[str]
) -> tuple[Config, str]:
    """The config to evaluate with: --config if given, else the workdir's config.json (what the
    checkpoint was trained with), plus the --config.KEY=VALUE overrides."""
    if config_spec is None and workdir and (Path(workdir) / "config.json").exists():
        cfg = config_lib.from_json((Path(workdir) / "config.json").read_text())
        name = Path(workdir).name
    else:
        cfg, name = config_lib.load_config_file(config_spec)
    return config_lib.validate(config_lib.apply_overrides(cfg, overrides)), name


def evaluate_only(cfg: Config, workdir: str | Path) -> tuple[dict[str, float], str]:
    """Evaluates on data.eval_split (train.eval_steps batches at most) the newest checkpoint in
    workdir/checkpoints, or, when there is none, the parameters `Trainer.initialize()` makes
    (random, or imported where the model config says so). Returns (metrics, what was
    evaluated). Nothing is written."""
    from lmflax.train.checkpoint import Checkpointer
    from lmflax.train.loop import Trainer, evaluate

    if not cfg.data.eval_split:
        raise ConfigError("--eval_only needs data.eval_split (it is empty)")
    trainer = Trainer.create(cfg, init=False)
    ckpt_dir = Path(workdir) / "checkpoints"
    with trainer.context():
        step = None
        if ckpt_dir.is_dir():
            ckpt = Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints, async_save=False)
            try:
                step = ckpt.latest_step()
                if step is not None:
                    arrays, _ = ckpt.restore(step, trainer.abstract_for_restore(), None)
                    state = trainer.state.with_arrays(arrays)
            finally:
                ckpt.close()
        if step is None:
            state = trainer.initialize()
            source = f"fresh parameters (no checkpoint in {ckpt_dir})"
            init_from = getattr(cfg.model, "init_from", None)
            if init_from:
                source = f"parameters from {init_from} (no checkpoint in {ckpt_dir})"
        else:
            source = f"checkpoint step {step} of {ckpt_dir}"
        log.info("evaluating %s on %s", source, cfg.data.eval_split)
        values = evaluate(
            trainer, state, cfg.data.eval_split, cfg.train.eval_steps, trainer.jit_eval_step()
        )
    return values, source


def format_table(values: dict[str, float], title: str) -> str:
    """A two-column text table of metric values."""
    width = max([len("metric"), *(len(k) for k in values)])
    lines = [title, f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    for k, v in values.items():
        lines.append(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)


def main(
    config_spec: str | None,
    workdir: str | None,
    overrides: list[str],
    *,
    stream: TextIO | None = None,
) -> int:
    """`train.py --eval_only`: prints the metrics table (and one JSON line) to stdout. Exit
    codes as train.py's: 0, 1 runtime failure, 2 bad config."""
    import tensorflow_datasets as tfds

    from lmflax.data.sources import DataError

    tfds.disable_progress_bar()
    out = stream or sys.stdout
    try:
        cfg, name = load_config(config_spec, workdir, overrides)
        workdir = workdir or str(Path("runs") / name)
        values, source = evaluate_only(cfg, workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        title = f"{cfg.task.name} on {cfg.data.dataset} [{cfg.data.eval_split}]: {source}"
        print(format_table(values, title), file=out)
        print(json.dumps({"eval": values, "source": source}), file=out)
    return 0
