"""The GPU compiler's view of a train step, without a GPU: lmflax's step and the plain-Flax peers'
compiled by XLA:GPU for an H100/H200 described to it (`lmflax.plan.gpu_topology_devices`), then
read from the optimised HLO.

  python -m benchmarks.gpu_compile --gpu=h200 --peers_dir=../shared/peers
  python -m benchmarks.gpu_compile --only=lmflax_gpt2_tuned --config.model.scan_layers=true

Counts what one step launches (top-level fusions, library calls and copies, a while loop's body
times its trip count), the cuDNN attention calls and whether they read a bias, the copies of
whole state arrays (a sign the donated buffers are not updated in place), the bytes those kernels
read and write (every operand and result counted whole: an upper estimate of HBM traffic), and
XLA's temporary memory. This is structure, not speed: without the device XLA:GPU picks kernels by heuristics
rather than autotuning and reports no FLOP or time estimate. It needs jax's CUDA plugin and
nvidia-cudnn-cu12 (both in the test extra); nothing else about the GPU.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z\-]+)\((.*)$")


def _bytes(shape: str) -> int:
    """Bytes of an HLO shape text (a tuple counts all its elements)."""
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 8 if dtype.endswith("64") else 4)
    return total


def _sliced(body: list[str], out_bytes: int, in_bytes: list[int]) -> tuple[int, list[int]]:
    """A fusion's bytes when it only slices some operands (a scanned layer's weights out of the
    stacked array, a chunk out of a batch) or updates a slice of its result in place: the slices
    count, not the whole arrays."""
    params: dict[str, int] = {}
    uses: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    root_update = None
    for line in body:
        d = _DEF.match(line)
        if not d:
            continue
        var, shape, op, rest = d.groups()
        if op == "parameter":
            params[var] = int(rest.split(")", 1)[0])
            continue
        args = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        for i, a in enumerate(args):
            uses[a].append((op if i == 0 else "operand", _bytes(shape)))
        if op == "dynamic-update-slice" and line.lstrip().startswith("ROOT") and args:
            root_update = (args[0], args[1] if len(args) > 1 else None)
    sizes = dict(enumerate(in_bytes))
    for var, index in params.items():
        if index >= len(in_bytes):
            continue
        kinds = uses.get(var, [])
        if kinds and all(k in ("dynamic-slice", "slice") for k, _ in kinds):
            sizes[index] = sum(b for _, b in kinds)
    if root_update is not None:
        target, update = root_update
        update_bytes = next(
            (
                _bytes(d.group(2))
                for line in body
                if (d := _DEF.match(line)) and d.group(1) == update
            ),
            None,
        )
        if target in params and update_bytes is not None:
            sizes[params[target]] = 0  # updated in place
            out_bytes = update_bytes
    return out_bytes, [sizes[i] for i in range(len(in_bytes))]


def _computations(hlo: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            head = line.split(" ", 2)
            name = "ENTRY" if head[0] == "ENTRY" else head[0].lstrip("%")
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            out[name].append(line)
    return out


def hlo_summary(hlo: str) -> dict[str, Any]:
    """Kernel launches per step and what they are, read from optimised XLA:GPU HLO text, and
    the bytes those kernels read and write (each operand and result counted whole: an upper
    estimate of HBM traffic, comparable between steps compiled the same way)."""
    comps = _computations(hlo)
    launches: collections.Counter[str] = collections.Counter()
    copies = 0
    moved = 0

    def walk(name: str, times: int) -> None:
        nonlocal copies, moved
        sizes: dict[str, int] = {}
        for line in comps.get(name, []):
            d = _DEF.match(line)
            if not d:
                continue
            var, shape, op, rest = d.groups()
            sizes[var] = _bytes(shape)
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", line)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                if body:
                    walk(body.group(1), times * (int(trips.group(1)) if trips else 1))
                continue
            if op not in ("fusion", "custom-call", "copy"):
                continue
            if op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', line)
                launches[target.group(1) if target else "custom-call"] += times
            else:
                launches[op] += times
            if op == "copy":
                copies += times
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            out_bytes, in_bytes = sizes[var], [sizes.get(o, 0) for o in operands]
            called = re.search(r"calls=%?([\w.\-]+)", line)
            if op == "fusion" and called:
                out_bytes, in_bytes = _sliced(comps.get(called.group(1), []), out_bytes, in_bytes)
            moved += times * (out_bytes + sum(in_bytes))

    walk("ENTRY", 1)
    fmha = {k: v for k, v in launches.items() if k.startswith("__cudnn$fmha")}
    return {
        "launches": sum(launches.values()),
        "fusions": launches["fusion"],
        "copies": copies,
        "cudnn_attention": sum(fmha.values()),
        "cudnn_attention_with_bias": sum(v for k, v in fmha.items() if "Bias" in k),
        "kernel_bytes": moved,
        "kernel_gib": round(moved / 2**30, 2),
        "library_calls": {k: v for k, v in launches.items() if k not in ("fusion", "copy")},
    }


def _record(name: str, compiled: Any, compile_s: float) -> dict[str, Any]:
    mem = compiled.memory_analysis()
    return {
        "what": name,
        **hlo_summary(compiled.as_text() or ""),
        "temp_gib": round(mem.temp_size_in_bytes / 2**30, 3),
        "argument_gib": round(mem.argument_size_in_bytes / 2**30, 3),
        "aliased_gib": round(mem.alias_size_in_bytes / 2**30, 3),
        "compile_s": round(compile_s, 1),
    }


def compile_lmflax(cfg: Any, devices: list[Any], *, packed: bool) -> Any:
    """lmflax's real train step for `cfg`, compiled for `devices` on the benchmark's batches
    (whole sequences, or packed documents with their segment ids / padding masks)."""
    from benchmarks.train_throughput import synthetic_batch
    from lmflax.train import Trainer, plan

    trainer = Trainer.create(cfg, init=False, devices=devices)
    example = synthetic_batch(cfg, 1, np.random.default_rng(0), packed=packed)
    return plan.compile_train_step(trainer, example)


def lmflax_step(spec: str, overrides: list[str], devices: list[Any], packed: bool) -> Any:
    """`compile_lmflax` for the config file `spec` (FILE[:ARG]) with overrides."""
    cfg, _ = common.load_config(spec, overrides)
    return compile_lmflax(cfg, devices, packed=packed)


def peer_step(peers: Path, which: str, devices: list[Any]) -> Any:
    """The plain-Flax peer's model and step (AdamW, donated, float32 loss), compiled for
    `devices` at the batch the side-by-side run uses."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    script = "plain_flax_bert.py" if which == "bert" else "plain_flax_gpt.py"
    src = (peers / script).read_text()
    src = src[: src.index("\nif __name__ ==")]
    module = types.ModuleType(f"peer_{which}")  # Flax modules are dataclasses: a real module
    sys.modules[module.__name__] = module
    exec(compile(src, str(peers / script), "exec"), module.__dict__)
    ns = module.__dict__
    if which == "bert":
        model, shape, decay = ns["Bert"](impl="cudnn", tt="onehot"), (128, 128), 0.01
    elif which == "gpt2":
        model, shape, decay = (
            ns["GPT"](50304, 12, 768, 12, 1024, "cudnn", False, False),
            (32, 1025),
            0.1,
        )
    else:
        model, shape, decay = (
            ns["GPT"](50304, 24, 2048, 16, 2048, "cudnn", True, False),
            (8, 2049),
            0.1,
        )
    causal = which != "bert"
    mesh = topologies.make_mesh(topologies.TopologyDescription(devices), (len(devices),), ("d",))
    whole = NamedSharding(mesh, PartitionSpec())

    def inputs(ids: jax.Array) -> jax.Array:
        return ids[:, :-1] if causal else ids

    def loss_fn(p: Any, ids: jax.Array) -> jax.Array:
        logits = model.apply(p, inputs(ids)).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, ids[:, 1:] if causal else ids
        ).mean()

    tx = optax.adamw(1e-4, weight_decay=decay)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p: Any, o: Any, ids: jax.Array) -> Any:
        loss, g = jax.value_and_grad(loss_fn)(p, ids)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    ids = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=whole)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(1), inputs(jnp.zeros(shape, jnp.int32)))
    )
    opt = jax.eval_shape(tx.init, params)
    on_mesh = functools.partial(
        jax.tree.map, lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole)
    )
    return step.lower(on_mesh(params), on_mesh(opt), ids).compile()


def jobs(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    cfg = "benchmarks/bench_configs"
    lm = functools.partial(lmflax_step, devices=args.devices)
    peer = functools.partial(peer_step, Path(args.peers_dir), devices=args.devices)
    return {
        "lmflax_gpt2_tuned": lambda: lm(f"{cfg}/gpt2_small.py:tuned", overrides, packed=False),
        "lmflax_gpt2_base": lambda: lm(f"{cfg}/gpt2_small.py:base", overrides, packed=False),
        "lmflax_gpt2_tuned_packed": lambda: lm(
            f"{cfg}/gpt2_small.py:tuned", overrides, packed=True
        ),
        "plain_flax_gpt2": lambda: peer("gpt2"),
        "lmflax_bert_tuned": lambda: lm(f"{cfg}/bert_base.py:tuned", overrides, packed=False),
        "plain_flax_bert": lambda: peer("bert"),
        "lmflax_gpt_1p3b_tuned": lambda: lm(f"{cfg}/gpt_1p3b.py:tuned", overrides, packed=False),
        "plain_flax_gpt_1p3b": lambda: peer("1p3b"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="h200", help="h100 or h200 (lmflax.plan.GPU_TARGETS)")
    parser.add_argument(
        "--peers_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "peers")
    )
    parser.add_argument("--only", default="", help="comma-separated job names (default: all)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args, overrides = common.split_overrides(parser, sys.argv[1:] if argv is None else argv)
    from lmflax.train import plan

    args.devices = plan.gpu_topology_devices(args.gpu)
    todo = jobs(args, overrides)
    names = [n for n in args.only.split(",") if n] or list(todo)
    unknown = sorted(set(names) - set(todo))
    if unknown:
        parser.error(f"unknown jobs {unknown}; known: {', '.join(todo)}")
    if any(n.startswith("plain") for n in names) and not Path(args.peers_dir).is_dir():
        parser.error(f"--peers_dir {args.peers_dir} does not exist (the plain-Flax scripts)")
    rows = []
    for name in names:
        t0 = time.perf_counter()
        rec = {"gpu": args.gpu, **_record(name, todo[name](), time.perf_counter() - t0)}
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    print(
        f"\n| step, compiled for {args.gpu} | launches | copies | cuDNN attn (bias) "
        "| kernel GiB | temp GiB |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['what']} | {r['launches']} | {r['copies']} | {r['cudnn_attention']} "
            f"({r['cudnn_attention_with_bias']}) | {r['kernel_gib']} | {r['temp_gib']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
