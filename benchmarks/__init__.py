"""Throughput, compile-time and attention benchmarks (run as modules: python -m benchmarks.X)."""
