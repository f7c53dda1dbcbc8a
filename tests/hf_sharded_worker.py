"""Runs in a subprocess with fake CPU devices (JAX fixes the device count at start-up) for
tests/test_hf_sharded.py: loads sharded Hugging Face checkpoints straight into an fsdp mesh and
reports, as JSON on its line starting 'RESULT ', what each parameter's shards look like, how many bytes this
process read, and whether the values equal an unsharded load.

  python tests/hf_sharded_worker.py one LLAMA_DIR GPT2_DIR OUT       # 1 process, 8 devices
  python tests/hf_sharded_worker.py two LLAMA_DIR OUT ADDRESS ID     # 2 processes x 4 devices
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if sys.argv[1] == "two":  # before any device is touched
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(sys.argv[4], num_processes=2, process_id=int(sys.argv[5]))

import numpy as np  # noqa: E402

import lmflax  # noqa: E402
from lmflax.config import MeshConfig  # noqa: E402
from lmflax.hf import files  # noqa: E402
from lmflax.hf.convert import flatten, fmt_path  # noqa: E402
from lmflax.parallel import distributed, make_mesh  # noqa: E402


def sharded_load(directory: str, **kwargs) -> dict:
    """from_pretrained on an fsdp=8 mesh: per-parameter shard shapes, bytes read, equality."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    files.read_counter.reset()
    _, params = lmflax.from_pretrained(directory, mesh=mesh, **kwargs)
    counter = files.read_counter
    report = {
        "bytes": counter.bytes,
        "largest": counter.largest,
        "whole": counter.whole,
        "leaves": {},
    }
    _, ref = lmflax.from_pretrained(directory, **kwargs)  # unsharded: whole tensors
    ref = flatten(ref)
    for path, x in flatten(params).items():
        shards = x.addressable_shards
        report["leaves"][fmt_path(path)] = {
            "shape": list(x.shape),
            "spec": [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec],
            "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
            "devices": len(shards),
            "equal": all(np.array_equal(np.asarray(s.data), ref[path][s.index]) for s in shards),
            "dtype": str(x.dtype),
        }
    report["params"] = params
    return report


def one(llama: str, gpt2: str, out: str) -> dict:
    result = {}
    for name, directory, kwargs in (
        ("llama", llama, {}),
        ("llama_scanned", llama, {"scan_layers": True}),
        ("gpt2", gpt2, {}),
    ):
        report = sharded_load(directory, **kwargs)
        params = report.pop("params")
        result[name] = report
        config = lmflax.hf.model_config(directory, **kwargs)
        # The sharded parameters exported tensor by tensor into several shards.
        lmflax.hf.save_pretrained(config, params, Path(out) / name, max_shard_size="60KB")
    result["trainer"] = trainer(llama)
    return result


def trainer(llama: str) -> dict:
    """A training run's start from `model=hf:DIR` (model.init_from) on mesh fsdp=8."""
    from lmflax.config import apply_overrides, load_config_file
    from lmflax.train import Trainer, resolve

    cfg, _ = load_config_file("gpt_tiny")
    cfg = apply_overrides(
        cfg,
        [
            f"model=hf:{llama}",
            f"data.tokenizer=hf:{llama}",
            "data.seq_len=16",
            "data.batch_size=8",
            "mesh.data=1",
            "mesh.fsdp=8",
            "mesh.tensor=1",
        ],
    )
    cfg = resolve(cfg)
    files.read_counter.reset()
    trainer = Trainer.create(cfg)
    read = {"bytes": files.read_counter.bytes, "largest": files.read_counter.largest}
    _, want = lmflax.from_pretrained(llama)
    got, want = flatten(trainer.state.params), flatten(want)
    return {
        **read,
        "init_from": cfg.model.init_from,
        "equal": sorted(p for p in want if np.array_equal(np.asarray(got[p]), want[p])),
        "params": sorted(want),
        "shard_shapes": {
            fmt_path(p): sorted({tuple(s.data.shape) for s in x.addressable_shards})
            for p, x in got.items()
        },
    }


def two(llama: str, out: str) -> dict:
    report = sharded_load(llama)
    del report["params"]
    report["process"] = jax.process_index()
    report["local_devices"] = jax.local_device_count()
    # A value that costs I/O (a LoRA base's checksums) is computed on process 0 and shared.
    computed = []
    report["coordinator_value"] = distributed.from_coordinator(
        lambda: computed.append(1) or {"from": jax.process_index(), "files": {"a": [1, "x"]}}
    )
    report["computed"] = len(computed)
    # Scanned layers: each stacked parameter is read from the per-layer tensors; the export
    # takes one layer of it at a time from both processes' devices.
    scanned = sharded_load(llama, scan_layers=True)
    params = scanned.pop("params")
    report["scanned"] = scanned
    config = lmflax.hf.model_config(llama, scan_layers=True)
    lmflax.hf.save_pretrained(config, params, Path(out), max_shard_size="60KB")
    return report


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    result = one(*args) if mode == "one" else two(args[0], args[1])
    print("RESULT " + json.dumps(result, default=list))  # (gloo prints to stdout too)
