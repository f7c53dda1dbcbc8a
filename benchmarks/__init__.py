"""Throughput, compile-time and attention benchmarks (run as modules: python -m benchmarks.X)."""

# Before any benchmark imports jax: without an NVIDIA driver, jax's CUDA plugin (the test extra's)
# must skip its CUDA check, or compiling for a described GPU fails (lmflax/config/jax_env.py).
import lmflax.config.jax_env  # noqa: F401
