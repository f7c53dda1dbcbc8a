"""Attention alone: lmflax.nn.dot_product_attention per implementation, forward and
forward+backward, over sequence lengths at a fixed number of tokens.

  python -m benchmarks.attention                       # XLA and this backend's fused kernel
  python -m benchmarks.attention --seq=512,1024,2048 --heads=16 --head_dim=128 --causal=true

Each line: median times, TFLOP/s (forward 4·B·N·T·S·H, halved when causal; backward counted as
2.5× forward, as the peers' ceilings script does) and, per kernel, its speed-up over XLA.
An implementation that cannot run this shape reports why instead of a time.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks import common


def bench(
    impl: str,
    *,
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    causal: bool,
    packed: bool,
    steps: int,
) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lmflax import nn as lnn

    dt = lnn.as_dtype(dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dt)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dt)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dt)
    cot = jax.random.normal(keys[3], q.shape, dt)
    mask = None
    if packed:
        rng = np.random.default_rng(0)
        ids = np.cumsum(rng.random((batch, seq)) < 4.0 / seq, axis=1).astype(np.int32) + 1
        mask = lnn.SegmentIds.packed(jnp.asarray(ids))

    def attend(q, k, v):
        return lnn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * cot.astype(jnp.float32))

    record: dict[str, Any] = {"what": "attention", "impl": impl}
    try:
        fwd = jax.jit(attend)
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        fwd.lower(q, k, v)  # a kernel that cannot run this call raises here, saying why
    except ValueError as e:
        return {**record, "error": str(e)}
    t_f, _ = common.median_time(lambda: fwd(q, k, v).block_until_ready(), steps, warmup=2)
    t_b, _ = common.median_time(lambda: jax.block_until_ready(fwd_bwd(q, k, v)), steps, warmup=2)
    flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return {
        **record,
        "fwd_ms": t_f * 1e3,
        "fwd_bwd_ms": t_b * 1e3,
        "fwd_tflops": flops / t_f / 1e12,
        "fwd_bwd_tflops": 3.5 * flops / t_b / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", default="512,1024,2048", help="comma-separated lengths")
    parser.add_argument("--tokens", type=int, default=16384, help="batch × seq per call")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=None, help="default: heads")
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--causal", default="true,false", help="true, false or both")
    parser.add_argument("--packed", action="store_true", help="SegmentIds of packed documents")
    parser.add_argument("--impls", default="auto", help="'auto' (xla + this backend's kernel)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None, help="append JSON lines to this file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import jax

    facts = common.device_facts()
    if args.impls == "auto":
        kernel = {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend())
        impls = ["xla", *([kernel] if kernel else [])]
    else:
        impls = args.impls.split(",")
    causals = [{"true": True, "false": False}[c] for c in args.causal.split(",")]
    for seq in (int(s) for s in args.seq.split(",")):
        batch = max(1, args.tokens // seq)
        for causal in causals:
            shape = {
                "batch": batch,
                "seq": seq,
                "heads": args.heads,
                "kv_heads": args.kv_heads or args.heads,
                "head_dim": args.head_dim,
                "dtype": args.dtype,
                "causal": causal,
                "packed": args.packed,
            }
            results = {impl: bench(impl, **shape, steps=args.steps) for impl in impls}
            xla = results.get("xla", {})
            for impl, r in results.items():
                if impl != "xla" and "fwd_bwd_ms" in r and "fwd_bwd_ms" in xla:
                    r["speedup_fwd_vs_xla"] = xla["fwd_ms"] / r["fwd_ms"]
                    r["speedup_fwd_bwd_vs_xla"] = xla["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                common.emit({**r, **shape, **facts}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
