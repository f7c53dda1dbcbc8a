"""`Run.open(workdir)`: a saved run read back — its config, a `Trainer` for it, and the
parameters of one of its checkpoints. Evaluation, generation, pictures and word vectors all
open runs this way."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from etils import epath

from lmflax import config as config_lib
from lmflax import storage
from lmflax.config import Config, ConfigError
from lmflax.core.state import TrainState
from lmflax.hf import adapters, save_pretrained
from lmflax.hf.pretrained import parse_init_from
from lmflax.tasks import Task
from lmflax.train.checkpoint import Checkpointer, CheckpointIntegrityError, verify_on_one_process
from lmflax.train.checks import resolve
from lmflax.train.trainer import Trainer

log = logging.getLogger(__name__)


class NoRunError(ConfigError):
    """The workdir holds no run (no config.json) or no finished checkpoint to open."""


def local_devices_config(cfg: Config) -> Config:
    """cfg with a mesh and global batch for whatever devices are here (inspection runs on this
    machine, not on the training mesh; the model stays the run's)."""
    return config_lib.override(
        cfg,
        {
            "mesh.data": -1,
            "mesh.fsdp": 1,
            "mesh.tensor": 1,
            "data.batch_size": jax.device_count(),
            "optimizer.grad_accum_steps": 1,
        },
    )


@dataclasses.dataclass
class Run:
    """A run opened from its workdir. `step` is the checkpoint's, or None for fresh parameters
    (only with `Run.open(..., fresh=True)` on a workdir that has no checkpoint)."""

    workdir: epath.Path
    cfg: Config
    trainer: Trainer
    state: TrainState
    step: int | None

    @property
    def task(self) -> Task:
        return self.trainer.task

    @property
    def params(self) -> Any:
        """The model's parameters (with LoRA: the adapters merged into the base)."""
        return self.trainer.model_params(self.state)

    def export_hf(self, out: str | os.PathLike, **kwargs: Any) -> Path | epath.Path:
        """Writes the run's model as a Hugging Face directory (`lmflax.hf.save_pretrained`;
        kwargs: tokenizer, architecture); a LoRA run's adapters are merged in (W + (alpha/r)·A·B).
        `out` may be a gs:// URL: the folder is written locally, then copied there."""
        plan = self.trainer.lora_plan
        target = storage.to_path(out)
        with storage.local_staging(target) as local:
            local = Path(local)
            if plan is None:
                save_pretrained(self.cfg.model, self.params, local, **kwargs)
            else:
                adapters.save_merged(
                    self.cfg.model, plan, self.state.frozen, self.state.params, local, **kwargs
                )
        return storage.plain(target)

    def export_peft(
        self, out: str | os.PathLike, *, base_model_name_or_path: str | None = None
    ) -> Path | epath.Path:
        """Writes a LoRA run's adapters as a PEFT adapter folder (adapter_config.json +
        adapter_model.safetensors). The base it names defaults to model.init_from's directory."""
        plan = self.trainer.lora_plan
        if plan is None:
            raise ConfigError(f"{self.workdir} is no LoRA run (model.lora.rank is 0)")
        init_from = getattr(self.cfg.model, "init_from", None)
        if base_model_name_or_path is None and init_from:
            base_model_name_or_path = str(parse_init_from(init_from))
        target = storage.to_path(out)
        with storage.local_staging(target) as local:
            adapters.save_peft_adapter(
                self.cfg.model,
                plan,
                self.params,
                self.state.params,
                Path(local),
                base_model_name_or_path=base_model_name_or_path,
            )
        return storage.plain(target)

    @property
    def source(self) -> str:
        """What the parameters are, in words (for reports)."""
        directory = self.workdir / "checkpoints"
        if self.step is not None:
            return f"checkpoint step {self.step} of {directory}"
        init_from = getattr(self.cfg.model, "init_from", None)
        what = f"parameters from {init_from}" if init_from else "fresh parameters"
        return f"{what} (no checkpoint in {directory})"

    @classmethod
    def open(
        cls,
        workdir: str | os.PathLike,
        overrides: Sequence[str] = (),
        step: int | None = None,
        *,
        config: Config | None = None,
        local_devices: bool = False,
        fresh: bool = False,
    ) -> Run:
        """Opens the run in `workdir` at checkpoint `step` (default: the newest).

        The config is workdir/config.json (what the checkpoint was trained with), or `config`
        when given, with `overrides` ('KEY=VALUE') on top. local_devices: put the model on this
        machine's devices whatever the run's mesh was. fresh: with no checkpoint, use the
        parameters `Trainer.initialize` makes (random, or imported from model.init_from)
        instead of raising NoRunError.
        """
        workdir = storage.absolute(storage.to_path(workdir))
        saved = workdir / "config.json"
        if config is None:
            if not saved.is_file():
                raise NoRunError(
                    f"no run in {workdir}: it has no config.json (train one with "
                    f"`lmflax train --workdir={workdir}`, or check the path)"
                )
            config = config_lib.from_json(saved.read_text())
        cfg = config_lib.apply_overrides(config, overrides)
        if local_devices:
            cfg = local_devices_config(cfg)
        cfg = resolve(cfg)
        trainer = Trainer.create(cfg, init=False)
        directory = workdir / "checkpoints"
        steps: list[int] = []
        ckpt = None
        if directory.is_dir():
            # Read-only: a run may be training in this workdir (its unfinished save is left be).
            ckpt = Checkpointer(directory, keep=cfg.train.keep_checkpoints, read_only=True)
        try:
            steps = ckpt.all_steps() if ckpt is not None else []
            if step is not None and step not in steps:
                raise NoRunError(f"no checkpoint at step {step} in {directory}; there are {steps}")
            if not steps:
                if not fresh:
                    raise NoRunError(
                        f"no finished checkpoint in {directory}; train first (lmflax train "
                        f"--workdir={workdir}) or point --workdir at a trained run"
                    )
                with trainer.context():
                    state = trainer.initialize()
                return cls(workdir=workdir, cfg=cfg, trainer=trainer, state=state, step=None)
            step = max(steps) if step is None else step
            _verify(directory, step, steps, cfg.train.verify_checkpoints)
            with trainer.context():
                arrays, _ = ckpt.restore(step, trainer.abstract_for_restore(), None)
        finally:
            if ckpt is not None:
                ckpt.close()
        state = trainer.restored(arrays)
        return cls(workdir=workdir, cfg=cfg, trainer=trainer, state=state, step=step)


def _verify(directory: epath.Path, step: int, steps: list[int], verify: bool) -> None:
    """Refuses a checkpoint whose files differ from the sums recorded when it was saved (nothing
    is moved: opening a run only reads it)."""
    if not verify:
        log.warning("train.verify_checkpoints=false: opening checkpoint step %d unverified", step)
        return
    try:
        verify_on_one_process(directory / str(step))
    except CheckpointIntegrityError as e:
        others = [s for s in steps if s != step]
        raise CheckpointIntegrityError(
            f"checkpoint step {step} of {directory} is damaged: {e}. Open another step "
            f"({others if others else 'there is no other'}), or pass "
            "train.verify_checkpoints=false to open it anyway"
        ) from None
