"""`python train.py --generate --prompt=TEXT ...`: a trained run's output for some prompts.

Loads the run's saved config (workdir/config.json, with any --config.KEY=VALUE overrides on top,
e.g. --config.generate.beam_size=4), restores the newest checkpoint's parameters into the
config's mesh, and prints what the task generates for each prompt: a continuation (causal LM)
or a translation / summary (seq2seq), chosen as `cfg.generate` says.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import jax

from lmflax import config as config_lib
from lmflax.config import Config, ConfigError


def run_config(cfg: Config, workdir: Path, overrides: Sequence[str]) -> Config:
    """The config the run in `workdir` was trained with, plus `overrides`; `cfg` (the command
    line's) when the workdir has none."""
    saved = workdir / "config.json"
    if saved.exists():
        cfg = config_lib.apply_overrides(config_lib.from_json(saved.read_text()), overrides)
    return config_lib.validate(cfg)


def load_params(cfg: Config, workdir: Path) -> tuple[Any, Any, int]:
    """(trainer, params, step) from the newest checkpoint under workdir/checkpoints."""
    from lmflax.train.checkpoint import Checkpointer
    from lmflax.train.loop import Trainer

    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(
            f"no checkpoints in {directory}; train first (python train.py --config=... "
            f"--workdir={workdir}) or point --workdir at a trained run"
        )
    trainer = Trainer.create(cfg, init=False)
    ckpt = Checkpointer(directory, keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"no finished checkpoint in {directory}; train first")
        with trainer.context():
            arrays, _ = ckpt.restore(step, trainer.abstract_for_restore(), None)
    finally:
        ckpt.close()
    return trainer, arrays["params"], step


def main(
    cfg: Config,
    workdir: str | Path,
    prompts: Sequence[str],
    overrides: Sequence[str] = (),
    out: TextIO | None = None,
) -> int:
    """Prints each prompt and the model's output for it. Returns the exit code."""
    out = out or sys.stdout
    workdir = Path(workdir)
    if not prompts:
        raise ConfigError('--generate needs at least one --prompt="TEXT"')
    cfg = run_config(cfg, workdir, overrides)
    trainer, params, step = load_params(cfg, workdir)
    task = trainer.task
    rng = jax.random.key(cfg.generate.seed)
    try:
        with trainer.context():
            outputs = task.generate_text(params, list(prompts), rng)
    except NotImplementedError as e:
        raise ConfigError(f"{e} (--generate works for 'causal_lm' and 'seq2seq')") from None
    g = cfg.generate
    how = (
        f"beam search, {g.beam_size} beams, length penalty {g.length_penalty}"
        if g.beam_size > 1
        else "greedy"
        if g.temperature == 0
        else f"sampling, temperature {g.temperature}, top-k {g.top_k or 'off'}, top-p {g.top_p}"
    )
    print(f"# {cfg.task.name} model from {workdir} at step {step}; {how}", file=out)
    for prompt, text in zip(prompts, outputs, strict=True):
        print(f">>> {prompt}", file=out)
        print(text if cfg.task.name != "causal_lm" else prompt + text, file=out)
    return 0
