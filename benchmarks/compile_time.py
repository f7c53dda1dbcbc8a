"""Compile time of the train step against depth, with and without `scan_layers`.

  python -m benchmarks.compile_time --config=benchmarks/bench_configs/gpt2_small.py
  python -m benchmarks.compile_time --config=... --layers=2,24 --scan=true,false

For each depth and scan setting the whole train step (forward, backward, optimizer, with its
shardings) is traced and compiled for the current backend from abstract shapes — nothing is
allocated, so full-size models compile on a laptop — with the persistent compilation cache off.
`--gpu=h200` (or h100) compiles with XLA:GPU for that GPU instead, on a machine without one
(`lmflax.plan.gpu_topology_devices`; XLA:GPU skips autotuning there, which on the device adds
time that grows with the number of distinct matmuls, not with a scanned depth).
A scanned stack compiles one layer whatever the depth, so its compile time should barely grow;
an unrolled one grows with it. Prints one JSON line per compile and the deepest/shallowest
ratio per scan setting.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np

from benchmarks import common


def compile_step(cfg: Any, devices: list[Any] | None = None) -> dict[str, float]:
    """Trace and compile times (seconds) of cfg's train step, from abstract inputs, for
    `devices` (default this machine's)."""
    import jax

    from lmflax.train import Trainer

    trainer = Trainer.create(cfg, init=False, devices=devices)
    arrays = trainer.abstract_for_restore()
    state = trainer.state.with_arrays(arrays)
    rows = cfg.data.batch_size
    batch = {
        k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype, sharding=trainer.batch_sharding)
        for k, v in trainer.task.dummy_batch(1).items()
    }
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    step = trainer.jit_train_step()
    with trainer.context():
        t0 = time.perf_counter()
        lowered = step.lower(state, batch, key)
        trace_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lowered.compile()
        compile_s = time.perf_counter() - t0
    return {"trace_s": trace_s, "compile_s": compile_s, "total_s": trace_s + compile_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="config file, FILE or FILE:ARG")
    parser.add_argument("--layers", default="2,24", help="comma-separated depths")
    parser.add_argument("--scan", default="true,false", help="scan_layers settings to try")
    parser.add_argument("--repeats", type=int, default=1, help="compiles per setting (median)")
    parser.add_argument("--out", default=None, help="append JSON lines to this file")
    parser.add_argument("--gpu", default=None, help="compile for this GPU without one: h100, h200")
    args, overrides = common.split_overrides(parser, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        depths = [int(x) for x in args.layers.split(",")]
        scans = [{"true": True, "false": False}[x.strip().lower()] for x in args.scan.split(",")]
    except (ValueError, KeyError):
        parser.error(
            f"--layers takes integers and --scan true/false, got {args.layers!r}, {args.scan!r}"
        )
    common.no_persistent_cache()
    facts = common.device_facts()
    devices = None
    if args.gpu:
        from lmflax.train import plan

        devices = plan.gpu_topology_devices(args.gpu)
        facts = {**facts, "platform": "gpu (compiled without one)", "device_kind": args.gpu}
    results: dict[bool, dict[int, float]] = {}
    for scan in scans:
        cfgs = {}
        for depth in depths:
            cfgs[depth] = common.load_config(
                args.config,
                [*overrides, f"model.num_layers={depth}", f"model.scan_layers={scan}"],
            )
        # Depths interleaved within each repeat, so drifting machine load hits them alike.
        runs: dict[int, list[dict[str, float]]] = {d: [] for d in depths}
        for _ in range(args.repeats):
            for depth in depths:
                runs[depth].append(compile_step(cfgs[depth][0], devices))
        for depth in depths:
            cfg, name = cfgs[depth]
            med = {k: float(np.median([r[k] for r in runs[depth]])) for k in runs[depth][0]}
            results.setdefault(scan, {})[depth] = med["total_s"]
            common.emit(
                {
                    "what": "compile_time",
                    "config": name,
                    **facts,
                    "layers": depth,
                    "scan_layers": scan,
                    "d_model": cfg.model.d_model,
                    "batch": cfg.data.batch_size,
                    "seq": cfg.data.seq_len,
                    "repeats": args.repeats,
                    **med,
                },
                args.out,
            )
    lo, hi = min(depths), max(depths)
    for scan, by_depth in results.items():
        ratio = by_depth[hi] / by_depth[lo]
        common.emit(
            {
                "what": "compile_time_ratio",
                "scan_layers": scan,
                "layers": [hi, lo],
                "ratio": ratio,
                "platform": facts["platform"],
                "device_kind": facts["device_kind"],
            },
            args.out,
        )
        print(
            f"scan_layers={scan}: {hi} layers compile in {by_depth[hi]:.1f} s, {lo} layers in "
            f"{by_depth[lo]:.1f} s: ratio {ratio:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
