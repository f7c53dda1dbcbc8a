"""`lmflax generate`: a trained run's output for some prompts.

  lmflax generate --workdir=runs/wmt14_de_en --prompt="Guten Morgen!"
  lmflax generate --workdir=runs/gpt_tiny --prompt="def " --config.generate.temperature=0.8

Opens the run (its saved config, with any --config.KEY=VALUE overrides on top, e.g.
--config.generate.beam_size=4), restores the newest checkpoint into the config's mesh, and
prints what the task generates for each prompt: a continuation (causal LM) or a translation /
summary (seq2seq), chosen as `cfg.generate` says.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import jax

from lmflax import storage
from lmflax.cli import common
from lmflax.config import Config, ConfigError
from lmflax.train import Run


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `lmflax generate`."""
    common.add_config_arguments(parser, workdir_help="the trained run (default runs/<config>)")
    parser.add_argument(
        "--prompt", action="append", default=[], help="text to continue or translate (repeatable)"
    )
    return parser


def describe(cfg: Config) -> str:
    """How text is generated under cfg.generate, in words."""
    g = cfg.generate
    if g.beam_size > 1:
        return (
            f"beam search, {g.beam_size} beams, length penalty {g.length_penalty} "
            f"({g.length_penalty_form}), early stopping {g.early_stopping}"
        )
    if g.temperature == 0:
        return "greedy"
    return f"sampling, temperature {g.temperature}, top-k {g.top_k or 'off'}, top-p {g.top_p}"


def generate(
    workdir: str | Path,
    prompts: Sequence[str],
    overrides: Sequence[str] = (),
    *,
    config: Config | None = None,
    out: TextIO | None = None,
) -> int:
    """Prints each prompt and the model's output for it. Returns the exit code."""
    out = out or sys.stdout
    if not prompts:
        raise ConfigError('generation needs at least one --prompt="TEXT"')
    saved = (storage.to_path(workdir) / "config.json").exists()
    run = Run.open(workdir, overrides, config=None if saved else config)
    rng = jax.random.key(run.cfg.generate.seed)
    try:
        with run.trainer.context():
            outputs = run.task.generate_text(run.params, list(prompts), rng)
    except NotImplementedError as e:
        raise ConfigError(
            f"{e} (generation works for 'causal_lm', 'instruct' and 'seq2seq')"
        ) from None
    cfg = run.cfg
    print(f"# {cfg.task.name} model from {workdir} at step {run.step}; {describe(cfg)}", file=out)
    for prompt, text in zip(prompts, outputs, strict=True):
        print(f">>> {prompt}", file=out)
        print(text if cfg.task.name != "causal_lm" else prompt + text, file=out)
    return 0


def main(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    common.setup_logging(args.quiet)
    common.start_backends()
    config, name = (None, None)
    workdir = args.workdir
    if workdir is None or not (storage.to_path(workdir) / "config.json").exists():
        config, name = common.load_config(args.config, ())
        workdir = workdir or common.default_workdir(name)
    return generate(workdir, args.prompt, overrides, config=config)
