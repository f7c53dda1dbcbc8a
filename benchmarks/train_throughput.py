"""Training throughput of one lmflax config: the real train step (Trainer, shardings, donation,
optimizer) on synthetic batches of random tokens.

  python -m benchmarks.train_throughput --config=benchmarks/bench_configs/gpt2_small.py
  python -m benchmarks.train_throughput --config=benchmarks/bench_configs/tiny.py:gpt --steps=5
  python -m benchmarks.train_throughput --config=... --config.model.fused_qkv=true --out=r.jsonl

Reports: compile time (trace and XLA compile, persistent cache off), the median step time over
--steps steps after --warmup untimed ones, tokens/s, MFU against a given peak (--peak_tflops, or
the chip's datasheet bf16 rate) and against the bf16 matmul rate measured here, peak device
memory (where the runtime reports it) and XLA's compiled memory, which attention kernel ran, and
whether the state buffers were donated. One JSON line per run (stdout and --out) and a markdown
table. FLOPs per token use the peers' formula: 6·params + 12·layers·d_model·seq (×½ causal).

Batches are whole sequences (one document per row, no padding, as the peer scripts train);
--packed adds the packing metadata the real pipelines produce (segment ids and per-document
positions for GPT, an attention mask with padding for BERT) to measure its cost.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np

from benchmarks import common


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.add(record.getMessage().split("; q ")[0])


def synthetic_batch(cfg: Any, rows: int, rng: np.random.Generator, *, packed: bool) -> dict:
    """Random tokens shaped like the task's batches (never zeros: they can time faster)."""
    T, V = cfg.data.seq_len, cfg.model.vocab_size
    batch = {
        "inputs": rng.integers(0, V, (rows, T)).astype(np.int32),
        "targets": rng.integers(0, V, (rows, T)).astype(np.int32),
    }
    if cfg.task.name == "mlm":
        batch["weights"] = (rng.random((rows, T)) < cfg.task.mlm_probability).astype(np.float32)
        if packed:
            valid = np.ones((rows, T), np.int32)
            for r in range(0, rows, 4):  # a quarter of the rows end in padding
                valid[r, rng.integers(T // 2, T) :] = 0
            batch["attention_mask"] = valid
            batch["weights"] *= valid
        return batch
    batch["weights"] = np.ones((rows, T), np.float32)
    if packed:
        seg = np.zeros((rows, T), np.int32)
        pos = np.zeros((rows, T), np.int32)
        for r in range(rows):
            start, doc = 0, 1
            while start < T:
                n = int(min(T - start, rng.geometric(4.0 / T)))
                seg[r, start : start + n] = doc
                pos[r, start : start + n] = np.arange(n)
                start, doc = start + n, doc + 1
        batch["segment_ids"], batch["positions"] = seg, pos
    return batch


def flops_per_token(cfg: Any, n_params: int) -> float:
    m = cfg.model
    causal = 0.5 if cfg.task.name == "causal_lm" else 1.0
    return 6 * n_params + 12 * m.num_layers * m.d_model * cfg.data.seq_len * causal


def run(
    cfg: Any,
    *,
    name: str,
    steps: int = 20,
    warmup: int = 3,
    packed: bool = False,
    peak_flops: float | None = None,
    matmul_n: int | None = None,
) -> dict[str, Any]:
    """Builds, compiles and times the train step of `cfg`; returns the result record."""
    import jax

    from lmflax.train import Trainer

    common.no_persistent_cache()
    facts = common.device_facts()
    collect = _Collect()
    attention_log = logging.getLogger("lmflax.attention")
    saved = attention_log.level, attention_log.propagate
    attention_log.addHandler(collect)
    attention_log.setLevel(logging.DEBUG)
    attention_log.propagate = False
    try:
        t0 = time.perf_counter()
        trainer = Trainer.create(cfg)
        jax.block_until_ready(trainer.state.params)
        init_s = time.perf_counter() - t0
        rows = cfg.data.batch_size // jax.process_count()
        batch = trainer.global_batch(
            synthetic_batch(cfg, rows, np.random.default_rng(0), packed=packed)
        )
        key = jax.random.key(cfg.train.seed)
        step = trainer.jit_train_step()
        with trainer.context():
            t0 = time.perf_counter()
            lowered = step.lower(trainer.state, batch, key)
            trace_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
    finally:
        attention_log.removeHandler(collect)
        attention_log.setLevel(saved[0])
        attention_log.propagate = saved[1]
    hlo = compiled.as_text() or ""
    kernels = {
        "cudnn": hlo.count("__cudnn$fmha") > 0,
        "mosaic": "tpu_custom_call" in hlo,
    }
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) and cost else cost
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state.params))

    state = trainer.state
    probe = jax.tree.leaves(state.params)[0]
    state, metrics = compiled(state, batch, key)
    jax.block_until_ready((state, metrics))
    donated = probe.is_deleted()
    holder = {"state": state, "metrics": metrics}

    def one_step() -> None:
        holder["state"], holder["metrics"] = compiled(holder["state"], batch, key)
        jax.block_until_ready((holder["state"], holder["metrics"]))

    step_s, times = common.median_time(one_step, steps=steps, warmup=warmup)
    loss = float(jax.device_get(holder["metrics"]["loss"][0] / holder["metrics"]["loss"][1]))
    peak_mem = common.peak_memory_bytes()

    platform = facts["platform"]
    if matmul_n is None:
        matmul_n = 8192 if platform in ("gpu", "tpu", "cuda") else 1024
    measured = common.matmul_rate(matmul_n) if matmul_n else None
    peak = common.given_peak(facts["device_kind"], peak_flops)
    tok_s = cfg.data.batch_size * cfg.data.seq_len / step_s  # all devices
    chips = jax.device_count()
    fpt = flops_per_token(cfg, n_params)
    m = cfg.model
    return {
        "what": "lmflax",
        "name": name,
        **facts,
        "task": cfg.task.name,
        "params": n_params,
        "layers": m.num_layers,
        "d_model": m.d_model,
        "batch": cfg.data.batch_size,
        "seq": cfg.data.seq_len,
        "dtype": m.dtype,
        "packed": packed,
        "knobs": {
            "attention_impl": m.attention_impl,
            "fused_qkv": m.fused_qkv,
            "scan_layers": m.scan_layers,
            "remat": m.remat,
            "dropout": m.dropout_rate,
            "loss_chunk_size": cfg.task.loss_chunk_size,
            "mlm_max_predictions": cfg.task.mlm_max_predictions,
        },
        "attention": sorted(collect.messages),
        "fused_kernels_in_hlo": [k for k, v in kernels.items() if v],
        "donated": donated,
        "init_s": init_s,
        "trace_s": trace_s,
        "compile_s": compile_s,
        "step_ms": step_s * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "steps": steps,
        "tokens_s": tok_s,
        "flops_per_token": fpt,
        "xla_flops_per_step": (cost or {}).get("flops"),
        "peak_flops": peak,
        "mfu": tok_s * fpt / (peak * chips) if peak else None,
        "matmul_flops_measured": measured,
        "matmul_n": matmul_n,
        "mfu_measured": tok_s * fpt / (measured * chips) if measured else None,
        "peak_memory_gib": peak_mem / 2**30 if peak_mem else None,
        "compiled_memory_gib": {
            "arguments": mem.argument_size_in_bytes / 2**30,
            "outputs": mem.output_size_in_bytes / 2**30,
            "temp": mem.temp_size_in_bytes / 2**30,
            "aliased": mem.alias_size_in_bytes / 2**30,
        },
        "loss": loss,
    }


COLUMNS = [
    ("name", "run", "s"),
    ("device_kind", "device", "s"),
    ("batch", "batch", "d"),
    ("seq", "seq", "d"),
    ("step_ms", "step ms", ".1f"),
    ("tokens_s", "tokens/s", ",.0f"),
    ("mfu", "MFU (given peak)", ".1%"),
    ("mfu_measured", "MFU (measured matmul)", ".1%"),
    ("compile_s", "compile s", ".1f"),
    ("peak_memory_gib", "peak mem GiB", ".1f"),
]


def markdown_table(records: list[dict[str, Any]]) -> str:
    """A markdown table of result records (lmflax's and the peers' JSON lines)."""
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = []
    for r in records:
        cells = []
        for key, _, spec in COLUMNS:
            value = r.get(key, r.get("what") if key == "name" else None)
            cells.append(str(value) if spec in ("s", "d") and value is not None else "")
            if spec not in ("s", "d"):
                cells[-1] = common.fmt(value, spec)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="config file, FILE or FILE:ARG")
    parser.add_argument("--name", default=None, help="label of this run (default: config name)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--packed", action="store_true", help="batches with packing metadata")
    parser.add_argument("--peak_tflops", type=float, default=None, help="given peak, TFLOP/s")
    parser.add_argument(
        "--matmul_n", type=int, default=None, help="size of the measured matmul (0 = skip)"
    )
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    args, overrides = common.split_overrides(parser, sys.argv[1:] if argv is None else argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    logging.basicConfig(level=logging.WARNING)
    cfg, cfg_name = common.load_config(args.config, overrides)
    record = run(
        cfg,
        name=args.name or cfg_name,
        steps=args.steps,
        warmup=args.warmup,
        packed=args.packed,
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None,
        matmul_n=args.matmul_n,
    )
    common.emit(record, args.out)
    print(markdown_table([record]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
