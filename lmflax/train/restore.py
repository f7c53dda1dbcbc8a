"""Reading a run back: its config, task and the parameters of its newest checkpoint (for
inspection: lmflax.viz, lmflax.vectors). Training itself resumes in `loop.run`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from lmflax import config as config_lib
from lmflax.config import Config, ConfigError
from lmflax.tasks import Task


@dataclasses.dataclass
class Run:
    cfg: Config
    task: Task
    params: Any
    step: int


def load_run(workdir: str | Path, step: int | None = None) -> Run:
    """The run in `workdir` at checkpoint `step` (default: the newest), on this machine's devices
    (the mesh and batch are set for these devices; the model is the run's)."""
    from lmflax.train.checkpoint import Checkpointer
    from lmflax.train.loop import Trainer

    workdir = Path(workdir)
    saved = workdir / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"{workdir} is not a run directory: it has no config.json")
    cfg = config_lib.from_json(saved.read_text())
    # Inspection runs on whatever devices are here, not the training mesh.
    n = jax.device_count()
    cfg = config_lib.override(
        cfg,
        {
            "mesh.data": -1,
            "mesh.fsdp": 1,
            "mesh.tensor": 1,
            "data.batch_size": n,
            "optimizer.grad_accum_steps": 1,
        },
    )
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} has no checkpoints/ yet")
    trainer = Trainer.create(cfg, init=False)
    ckpt = Checkpointer(directory, keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no finished checkpoint")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ConfigError(f"no checkpoint at step {step} in {directory}; there are {steps}")
        with trainer.context():
            arrays, _ = ckpt.restore(step, trainer.abstract_for_restore(), None)
    finally:
        ckpt.close()
    return Run(cfg=cfg, task=trainer.task, params=arrays["params"], step=step)
