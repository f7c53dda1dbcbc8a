"""What the benchmarks share: command-line config handling, timing, device facts, output."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Dense bf16 peak of one chip (datasheet), by a substring of jax's device_kind. MFU is reported
# against this "given" peak and against the bf16 matmul rate measured on the spot.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v6": 918e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v4": 275e12,
}


def split_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, list[str]]:
    """Parses known flags; `--config.KEY=VALUE` (or `--config.KEY VALUE`) become overrides."""
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            parser.error(f"unrecognized argument {item!r} (overrides look like --config.KEY=V)")
        body = item[len("--config.") :]
        if "=" not in body:
            if i + 1 >= len(rest):
                parser.error(f"{item} needs a value: {item}=VALUE")
            body, i = f"{body}={rest[i + 1]}", i + 1
        overrides.append(body)
        i += 1
    return args, overrides


def load_config(spec: str, overrides: Sequence[str]) -> tuple[Any, str]:
    """A validated lmflax config from FILE[:ARG] plus overrides; exits 2 with the message on a
    bad config (as train.py does)."""
    from lmflax.config import ConfigError, apply_overrides, load_config_file
    from lmflax.train import resolve

    try:
        cfg, name = load_config_file(spec)
        return resolve(apply_overrides(cfg, overrides)), name
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def no_persistent_cache() -> None:
    """Compile times must be measured: never read a persistent compilation cache."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)


def median_time(fn: Callable[[], Any], steps: int, warmup: int) -> tuple[float, list[float]]:
    """Median wall time of fn() (which must block until its device work is done) over `steps`
    calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def device_facts() -> dict[str, Any]:
    import flax
    import jax

    d = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }


def given_peak(device_kind: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def matmul_rate(n: int, steps: int = 10) -> float:
    """Measured bf16 matmul FLOP/s of one device on an n×n×n product of random data."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    t, _ = median_time(lambda: f(a, b).block_until_ready(), steps=steps, warmup=2)
    return 2 * n**3 / t


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on device 0 since the process started (None where unreported: CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def emit(record: dict[str, Any], out: str | None) -> None:
    line = json.dumps(record, default=str)
    print(line, flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(line + "\n")


def fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return format(value, spec)
