"""train.py end to end in subprocesses: learning, checkpoints, resume (kill -9, SIGTERM and
exact resume are in test_reliability.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmflax.train.metrics import read_metrics

from .conftest import run_train

pytestmark = pytest.mark.slow

TINY = [
    "--config.model.num_layers=2",
    "--config.model.d_model=64",
    "--config.model.d_ff=128",
    "--config.data.seq_len=64",
    "--config.data.batch_size=8",
    "--config.train.sample_tokens=16",
    "--config.train.eval_steps=2",
    "--config.train.log_every=5",
]


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl")}


def _first_last_tenth(losses: dict[int, float]) -> tuple[float, float]:
    values = [losses[s] for s in sorted(losses)]
    k = max(1, len(values) // 10)
    return float(np.mean(values[:k])), float(np.mean(values[-k:]))


@pytest.mark.parametrize("config", ["gpt_tiny", "bert_tiny"])
def test_trains_checkpoints_and_resumes(config, data_dir, tmp_path):
    workdir = tmp_path / config
    args = [
        f"--config=configs/{config}.py",
        f"--workdir={workdir}",
        *TINY,
        "--config.train.steps=150",
        "--config.train.checkpoint_every=50",
        "--config.optimizer.warmup_steps=10",
    ]
    out = run_train(args, data_dir)
    assert "done: step 150" in out.stdout
    assert "sample after 150 steps" in out.stdout
    losses = _losses(workdir)
    assert sorted(losses) == list(range(5, 151, 5))
    first, last = _first_last_tenth(losses)
    assert last < first - 1.0, (first, last)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 150 and 100 in steps
    assert (workdir / "config.json").exists() and (workdir / "eval_metrics.jsonl").exists()
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

    if config != "gpt_tiny":
        return  # resuming is the same code for every model; once is enough
    again = run_train(args, data_dir)
    assert "resumed from" in again.stderr and "already complete at step 150" in again.stderr
    assert sorted(_losses(workdir)) == sorted(losses)

    longer = run_train(
        [
            *args[:-3],
            "--config.train.steps=160",
            "--config.train.checkpoint_every=50",
            "--config.optimizer.warmup_steps=10",
        ],
        data_dir,
    )
    assert "resumed from" in longer.stderr and "done: step 160" in longer.stdout
    assert max(_losses(workdir)) == 160


def test_workdir_of_another_model_is_refused(data_dir, tmp_path):
    args = [
        f"--workdir={tmp_path}",
        *TINY,
        "--config.train.steps=5",
        "--config.train.sample_tokens=0",
    ]
    run_train(args, data_dir)
    proc = run_train([*args, "--config.model.num_layers=3"], data_dir, check=False)
    assert (
        proc.returncode == 2
        and "different model config" in proc.stderr
        and "num_layers" in proc.stderr
    )
