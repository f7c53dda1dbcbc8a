"""Shared test setup: CPU only, quiet logs, one embedded-corpus data dir per test session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA's CPU compiler is slow here (seconds per small model); tests and the train.py subprocesses
# they start share one persistent compilation cache for the session (for all pytest-xdist
# workers of one run: PYTEST_XDIST_TESTRUNUID is the same in each).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"lmflax-jax-cache-{_RUN}")
    if _RUN
    else tempfile.mkdtemp(prefix="lmflax-jax-cache-"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tests run tiny shapes, so compiling is most of their time: without LLVM's backend
# optimisations XLA compiles about 40% faster here (benchmarks/ measure with the default level).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402  (after the environment it must see)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TFDS data dir holding the embedded corpus and its cached tokenizers (built once).

    LMFLAX_TEST_DATA_DIR reuses a directory across sessions (handy when iterating locally).
    Under pytest-xdist the workers share one directory (building is guarded by file locks).
    """
    path = os.environ.get("LMFLAX_TEST_DATA_DIR")
    if not path and _RUN:
        shared = tmp_path_factory.getbasetemp().parent / "tfds"
        shared.mkdir(exist_ok=True)
        path = str(shared)
    path = path or str(tmp_path_factory.mktemp("tfds"))
    import tensorflow_datasets as tfds

    from lmflax.data import sources

    tfds.disable_progress_bar()
    sources.ensure_embedded(path)
    return path


def run_train(
    args: list[str],
    data_dir: str,
    *,
    timeout: float = 600,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Runs `python train.py ARGS` in a subprocess with the test data dir."""
    full_env = {**os.environ, "TFDS_DATA_DIR": data_dir, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr[-5000:]}"
        )
    return proc


def jitted(
    module,
    method: str = "apply",
    static: tuple[str, ...] = (
        "deterministic",
        "decode",
        "method",
        "mutable",
        "is_causal",
        "return_hidden",
    ),
):
    """module.init / module.apply compiled once (eager Flax runs op by op, which is slow on CPU)."""
    import jax

    return jax.jit(getattr(module, method), static_argnames=static)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with tests marked slow (train.py subprocesses, multi-process runs) come first, so
    that under `pytest -n N --dist loadfile` no long file starts last while the other workers
    sit idle. Within a file the order is unchanged."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable
