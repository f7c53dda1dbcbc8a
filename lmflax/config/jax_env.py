"""Process environment that must be set before jax is imported (one place for the CLI, train.py
and the benchmarks)."""

from __future__ import annotations

import os


def skip_cuda_check_without_driver() -> None:
    """Without an NVIDIA driver, tell jax's CUDA plugin to skip its CUDA version check.

    The test extra installs the plugin to compile GPU programs on machines without a GPU. At
    start-up the plugin checks the CUDA runtime; with no driver that check fails ("Unable to load
    CUDA"), the plugin is not registered, and compiling for a described GPU topology then fails
    with "topology not implemented for cuda". With the check skipped the plugin registers (it can
    compile, not run) and JAX falls back to the CPU for running. Must be called before jax is
    imported; an explicit JAX_SKIP_CUDA_CONSTRAINTS_CHECK in the environment wins.
    """
    if not os.path.exists("/dev/nvidiactl"):
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


skip_cuda_check_without_driver()  # importing this module is enough
