"""Runs in a subprocess with several fake CPU devices (JAX reads the device count at start-up, so
the sharding tests cannot run inside the pytest process). Prints one JSON object on its last
line; tests/test_parallel.py checks it.

  python tests/parallel_worker.py meshes                       # needs 8 devices
  python tests/parallel_worker.py restore SRC STEP "MESH;MESH..." DST CONTINUE_SRC VALUES_NPZ
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmflax.config import load_config_file, override  # noqa: E402
from lmflax.core.losses import finalize  # noqa: E402

MESHES = {
    "data=8": {"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1},
    "fsdp=8": {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1},
    "tensor=8": {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 8},
    "data=2,fsdp=2,tensor=2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
}

# What tests/test_parallel.py trains through train.py (and restores here).
TRAIN_ARGS = [
    "--config.model.num_layers=2",
    "--config.model.d_model=64",
    "--config.model.num_heads=4",
    "--config.model.d_ff=128",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.data.num_shards=2",
    "--config.data.eval_split=",
    "--config.train.steps=5",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=3",
    "--config.train.keep_checkpoints=5",
    "--config.train.sample_tokens=0",
    "--config.train.progress=false",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.learning_rate=0.01",
]


def tiny_cfg(**updates):
    cfg, _ = load_config_file("gpt_tiny")
    return override(
        cfg,
        {
            "model.vocab_size": 128,
            "model.num_layers": 2,
            "model.d_model": 64,
            "model.num_heads": 8,
            "model.d_ff": 128,
            "model.max_len": 32,
            "data.batch_size": 8,
            "data.seq_len": 16,
            "optimizer.warmup_steps": 0,
            "optimizer.learning_rate": 1e-2,
            "optimizer.schedule": "constant",
            **updates,
        },
    )


def synthetic_batch(cfg, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    ids = rng.integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "positions": np.broadcast_to(np.arange(T), (B, T)).astype(np.int32),
        "segment_ids": np.ones((B, T), np.int32),
        "weights": np.ones((B, T), np.float32),
    }


def _spec(sharding) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]


def _paths(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _logical_names(trainer) -> dict[str, list]:
    import flax.linen as nn

    with trainer.context():
        boxed = jax.eval_shape(trainer.init_fn, trainer.init_rng)["params"]
    specs = nn.get_partition_spec(boxed)
    flat = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    return {jax.tree_util.keystr(p): list(s) for p, s in flat}


def _local_bytes(tree) -> int:
    """Bytes this process's first device actually holds for a tree of sharded arrays."""
    dev = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == dev)
    return total


def meshes() -> dict:
    import flax.linen as nn

    from lmflax.train import Trainer, plan

    assert jax.device_count() == 8, jax.devices()
    out: dict = {"losses": {}, "shardings": {}, "mesh_shape": {}}
    first = None
    for name, mesh in MESHES.items():
        cfg = tiny_cfg(**mesh)
        if first is None:
            tr = Trainer.create(cfg)
            state = tr.state
            # A host copy: the train step donates (deletes) the state it is given.
            first = jax.device_get(state.arrays())
        else:
            # One compiled init is enough (XLA's CPU compiler is slow): the same initial values
            # placed in this mesh's shardings.
            tr = Trainer.create(cfg, init=False)
            state = tr.state.with_arrays(jax.device_put(first, tr.state_shardings.arrays()))
        init_specs = {k: _spec(v.sharding) for k, v in _paths(state.params).items()}
        step = tr.jit_train_step()
        losses = []
        with tr.context():
            for i in range(5):
                state, m = step(state, tr.global_batch(synthetic_batch(cfg, i)), jax.random.key(i))
                losses.append(finalize(jax.device_get(m))["loss"])
        out["losses"][name] = losses
        out["mesh_shape"][name] = dict(tr.mesh.shape)
        after = {k: _spec(v.sharding) for k, v in _paths(state.params).items()}
        out["shardings"][name] = {"init": init_specs, "after": after}
        out["shapes"] = {k: list(v.shape) for k, v in _paths(state.params).items()}
        if name == "fsdp=8":
            out["logical"] = _logical_names(tr)
            # The planner's per-device bytes against what the devices really hold and what
            # the compiled step's memory analysis reports.
            p = plan.make_plan(tr)
            out["plan"] = {
                "param_bytes": p.param_bytes,
                "opt_state_bytes": p.opt_state_bytes,
                "batch_bytes": p.batch_bytes,
                "argument_bytes": p.argument_bytes,
                "temp_bytes": p.temp_bytes,
                "params": p.params,
                "real_param_bytes": _local_bytes(state.params),
                "real_opt_state_bytes": _local_bytes(state.opt_state),
                "whole_param_bytes": sum(x.nbytes for x in jax.tree.leaves(state.params)),
            }
            # Created in its shardings: the compiled init writes only each device's shards.
            with tr.context():
                init_mem = (
                    jax.jit(
                        lambda r, tr=tr: nn.meta.unbox(tr.init_fn(r)),
                        out_shardings=tr.state_shardings.arrays(),
                    )
                    .lower(tr.init_rng)
                    .compile()
                    .memory_analysis()
                )
            out["init_output_bytes"] = int(init_mem.output_size_in_bytes)
            out["init_temp_bytes"] = int(init_mem.temp_size_in_bytes)
    out["cli"] = cli_errors()
    return out


def cli_errors() -> dict:
    """train.py's exit code and message for a mesh that does not tile the 8 devices and for a
    global batch the data-parallel size does not divide (nothing is trained)."""
    import train

    results = {}
    cases = {
        "mesh": ["--config.mesh.data=3"],
        "batch": ["--config.mesh.data=8", "--config.data.batch_size=12"],
    }
    for name, args in cases.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = train.main([*args, "--workdir=/nonexistent/never-created", "-q"])
        results[name] = {"code": code, "stderr": err.getvalue()}
    return results


def _cfg_for_mesh(mesh: str):
    from lmflax.config import apply_overrides

    cfg, name = load_config_file("gpt_tiny")
    sizes = dict(kv.split("=") for kv in mesh.split(","))
    cfg = apply_overrides(
        cfg,
        [a[len("--config.") :] for a in TRAIN_ARGS]
        + [f"mesh.{k}={sizes.get(k, 1)}" for k in ("data", "fsdp", "tensor")],
    )
    return cfg, name


def restore(src: str, step: int, meshes: str, dst: str, cont: str, values: str) -> dict:
    """Restores checkpoint `step` of the train.py run in `src` onto each mesh of `meshes`
    (';'-separated) and checks shardings and values (against the first mesh's restore, and
    saves the last one to `values`); then copies checkpoint `step` of the run in `cont` to a new
    run in `dst` and lets the training loop continue it on the last mesh to the end."""
    from lmflax.train import Trainer, run
    from lmflax.train.checkpoint import Checkpointer

    out: dict = {"devices": jax.device_count(), "meshes": {}}
    first = None
    for mesh in meshes.split(";"):
        cfg, name = _cfg_for_mesh(mesh)
        tr = Trainer.create(cfg, init=False)
        ckpt = Checkpointer(Path(src) / "checkpoints", keep=5)
        batches = tr.batches(cfg.data.train_split, ckpt.data_shards(step))
        arrays, meta = ckpt.restore(step, tr.abstract_for_restore(), batches)
        batches.close()
        ckpt.close()
        wanted = _paths(tr.state_shardings.arrays())
        got = _paths(arrays)
        arrays_np = {k: np.asarray(v) for k, v in got.items()}
        first = arrays_np if first is None else first
        out["meshes"][mesh] = {
            "mesh_shape": dict(tr.mesh.shape),
            "meta": meta,
            "specs": {k: _spec(v.sharding) for k, v in got.items()},
            "shardings_as_requested": all(
                got[k].sharding.is_equivalent_to(wanted[k], got[k].ndim) for k in wanted
            ),
            "same_keys_as_first": sorted(first) == sorted(arrays_np),
            "max_abs_diff_to_first": max(
                float(np.max(np.abs(first[k] - arrays_np[k]))) for k in first
            ),
        }
    np.savez(values, **arrays_np)
    dst_dir = Path(dst)
    (dst_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(Path(cont) / "checkpoints" / str(step), dst_dir / "checkpoints" / str(step))
    shutil.copy(Path(cont) / "config.json", dst_dir / "config.json")
    summary = run(cfg, dst_dir, config_name=name)
    out["summary"] = {k: summary[k] for k in ("start_step", "final_step")}
    rows = [json.loads(line) for line in (dst_dir / "metrics.jsonl").read_text().splitlines()]
    out["losses"] = {r["step"]: r["loss"] for r in rows}
    return out


def main(argv: list[str]) -> None:
    if argv[0] == "meshes":
        result = meshes()
    elif argv[0] == "restore":
        result = restore(argv[1], int(argv[2]), *argv[3:7])
    else:
        raise SystemExit(f"unknown role {argv[0]!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
