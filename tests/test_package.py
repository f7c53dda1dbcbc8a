"""An installed wheel (not the repository) holds the trainer, the CLI and the shipped configs:
built with pip, installed into a folder of its own, run from another folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --no-deps` of a freshly built wheel into its own target folder (the
    dependencies come from this environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("lmflax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "lmflax/configs/gpt_tiny.py" in names
    # Data that a shipped config reads (package-data in pyproject.toml).
    assert "lmflax/configs/finetune/data/pystdlib_instruct.jsonl" in names
    assert "lmflax/cli/__init__.py" in names
    assert not any(n.startswith(("tests/", "configs/", "benchmarks/")) for n in names)
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return target


def _run(target: Path, cwd: Path, *args: str, data_dir: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
    if data_dir:
        env["TFDS_DATA_DIR"] = data_dir
    return subprocess.run(
        [str(target / "bin" / "lmflax"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_the_wheel_lists_subcommands_and_configs_from_another_folder(installed, tmp_path):
    where = subprocess.run(
        [sys.executable, "-c", "import lmflax; print(lmflax.__file__)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(installed)), where.stdout  # not the repository
    help_ = _run(installed, tmp_path, "--help")
    assert help_.returncode == 0, help_.stderr[-2000:]
    for command in ("train", "eval", "generate", "plan", "viz", "vectors", "config"):
        assert command in help_.stdout
    shown = _run(installed, tmp_path, "config", "show", "--config=bert_tiny")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert '"mlm"' in shown.stdout
    missing = _run(installed, tmp_path, "config", "show", "--config=bert_tiyn")
    assert missing.returncode == 2
    assert "did you mean 'bert_tiny'" in missing.stderr and "gpt_tiny" in missing.stderr


@pytest.mark.slow
def test_the_wheel_trains_by_config_name(installed, tmp_path, data_dir):
    proc = _run(
        installed,
        tmp_path,
        "train",
        "--config=gpt_tiny",
        "--config.train.steps=20",
        "--config.train.sample_tokens=0",
        "--config.data.eval_split=",
        data_dir=data_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 20" in proc.stdout
    assert (tmp_path / "runs" / "gpt_tiny" / "checkpoints" / "20").is_dir()
