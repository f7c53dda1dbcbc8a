"""Sharded training over device meshes, multi-process runs, restore across meshes, the planner
and ahead-of-time compilation for TPU slices.

Fake CPU devices need their count before JAX starts, so the mesh tests run tests/
parallel_worker.py (and train.py) in subprocesses; the cheap checks run in-process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest

from lmflax.config import ConfigError, load_config_file, override
from lmflax.data.shards import ShardedBatches
from lmflax.parallel import distributed
from lmflax.train.checkpoint import (
    DataStateError,
    _DataHandler,
    _DataRestore,
    _DataSave,
    _IteratorSnapshot,
)

from .conftest import ROOT
from .parallel_worker import MESHES, TRAIN_ARGS

WORKER = ROOT / "tests" / "parallel_worker.py"
TIMEOUT = 1200  # generous: these processes share 2 cores with the rest of the machine


# ---------------------------------------------------------------------------------------------
# Data shards and their checkpointed positions (in-process)


def _shard_stream(shard: int, num_shards: int, rows: int):
    """A real grain pipeline: the numbers shard, shard+S, ... in batches of `rows`."""
    ds = grain.MapDataset.range(10_000)[shard::num_shards].map(lambda i: {"x": np.array([i])})
    return ds.to_iter_dataset().batch(rows)


def _global_batches(num_shards: int, global_batch: int, steps: int) -> list[np.ndarray]:
    its = [
        iter(_shard_stream(s, num_shards, global_batch // num_shards)) for s in range(num_shards)
    ]
    return [np.concatenate([next(it)["x"] for it in its])[:, 0] for _ in range(steps)]


def _batches(rows, num_shards=2, global_batch=8, writes=()):
    return ShardedBatches(
        _shard_stream, global_batch=global_batch, num_shards=num_shards, rows=rows, writes=writes
    )


def test_process_rows_come_from_their_shards():
    expected = _global_batches(4, 8, 3)
    # Rows 0-1 and 6-7 of each global batch: shards 0 and 3 (2 rows each).
    b = _batches([(0, 2), (6, 8)], num_shards=4)
    assert b.shards == [0, 3]
    for want in expected:
        np.testing.assert_array_equal(next(b)["x"][:, 0], np.concatenate([want[:2], want[6:]]))
    # Fewer shards than processes: rows 4-7 of the only shard's batch.
    one = _global_batches(1, 8, 2)
    b = _batches([(4, 8)], num_shards=1)
    for want in one:
        np.testing.assert_array_equal(next(b)["x"][:, 0], want[4:])


def _save(directory: Path, batches: ShardedBatches) -> None:
    _DataHandler().save(directory, args=_DataSave(_IteratorSnapshot(batches)))


def _restore(directory: Path, batches: ShardedBatches) -> ShardedBatches:
    return _DataHandler().restore(directory, args=_DataRestore(batches))


def test_data_position_survives_a_change_of_process_count(tmp_path):
    expected = _global_batches(2, 8, 5)
    # Two processes, each reading and saving one shard, after 3 steps.
    two = [_batches([(0, 4)], writes=[0]), _batches([(4, 8)], writes=[1])]
    for _ in range(3):
        for p in two:
            next(p)
    for p in two:
        _save(tmp_path, p)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["shard_0-of-2.json", "shard_1-of-2.json"]
    # One process resumes with both shards, four processes with half a shard each.
    one = _restore(tmp_path, _batches([(0, 8)], writes=[0, 1]))
    np.testing.assert_array_equal(next(one)["x"][:, 0], expected[3])
    four = [_restore(tmp_path, _batches([(2 * i, 2 * i + 2)])) for i in range(4)]
    got = np.concatenate([next(p)["x"][:, 0] for p in four])
    np.testing.assert_array_equal(got, expected[3])
    # A stream of a different shard count cannot continue this position.
    with pytest.raises(DataStateError, match=r"2 data shards but this run reads 4"):
        _restore(tmp_path, _batches([(0, 8)], num_shards=4))


# ---------------------------------------------------------------------------------------------
# Joining a cluster (in-process; nothing here starts one)


def test_cluster_detection():
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    assert distributed.detect_cluster({**slurm, "SLURM_NTASKS": "2"}) == "slurm"
    assert distributed.detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "t1,t2"}) == "tpu"
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "t1"}) is None
    assert distributed.detect_cluster({}) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("localhost:1234", 2, None), "go together"),
        (("localhost:1234", 2, 2), r"must be in \[0, --num_processes\)"),
        (("localhost", 2, 0), "HOST:PORT"),
    ],
)
def test_distributed_arguments_are_checked(args, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(*args)


def test_single_process_stays_single():
    assert distributed.initialize(mode="off") == {
        "initialized": False,
        "process_index": 0,
        "process_count": 1,
    }


# ---------------------------------------------------------------------------------------------
# The planner (in-process, one CPU device)


def _gpt_params(V, D, L, F, P, tied=True):
    """GPT-2 from its formula: embeddings, per layer 4 biased D×D projections, two LayerNorms,
    a biased D→F→D MLP; a final LayerNorm; an output projection unless tied."""
    layer = 4 * (D * D + D) + 2 * 2 * D + (D * F + F) + (F * D + D)
    return V * D + P * D + L * layer + 2 * D + (0 if tied else D * V)


def _bert_mlm_params(V, D, L, F, P, types=2):
    """BERT from its formula: word/position/type embeddings and their LayerNorm, post-norm
    layers, then the MLM transform (D×D, LayerNorm) and the tied decoder's bias."""
    layer = 4 * (D * D + D) + 2 * 2 * D + (D * F + F) + (F * D + D)
    return V * D + P * D + types * D + 2 * D + L * layer + (D * D + D) + 2 * D + V


@pytest.mark.parametrize("name", ["gpt_tiny", "gpt2_small", "bert_tiny", "bert_base", "untied"])
def test_planner_counts_parameters_and_flops(name):
    from lmflax.train import Trainer, plan

    cfg, _ = load_config_file("gpt_tiny" if name == "untied" else name)
    if name == "untied":
        cfg = override(cfg, {"model.tie_embeddings": False})
    m = cfg.model
    V, D, L, F, P = m.vocab_size, m.d_model, m.num_layers, m.d_ff, m.max_len
    if m.family == "gpt":
        total = _gpt_params(V, D, L, F, P, tied=m.tie_embeddings)
        lookup = P * D + (0 if m.tie_embeddings else V * D)  # tables only indexed, never multiplied
    else:
        total = _bert_mlm_params(V, D, L, F, P)
        lookup = P * D + 2 * D
    if name == "gpt2_small":
        assert V == 50304 and _gpt_params(50257, D, L, F, P) == 124_439_808  # the published count
    costs = plan.model_costs(Trainer.create(cfg, init=False))
    assert costs["params"] == total
    assert costs["matmul_params"] == total - lookup
    attention = 12 * L * m.num_heads * (D // m.num_heads) * cfg.data.seq_len
    assert costs["flops_per_token"] == 6 * (total - lookup) + attention


def _small_cfg(**updates):
    """Dimensions in multiples of 128, as TPUs tile them (so padding does not blur the sums)."""
    cfg, _ = load_config_file("gpt_tiny")
    return override(
        cfg,
        {
            "model.vocab_size": 256,
            "model.num_layers": 1,
            "model.d_model": 256,
            "model.num_heads": 2,
            "model.d_ff": 512,
            "model.max_len": 128,
            "data.seq_len": 128,
            "data.batch_size": 8,
            **updates,
        },
    )


CLI_ARGS = [
    "--config.model.vocab_size=320",
    "--config.model.num_layers=1",
    "--config.model.d_model=64",
    "--config.model.num_heads=2",
    "--config.model.d_ff=128",
    "--config.model.max_len=32",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.mesh.data=1",
]


def _main(args):
    import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main(args)
    return code, out.getvalue(), err.getvalue()


def test_plan_cli_and_memory_budget(tmp_path):
    code, out, err = _main(["--plan", "--peak_tflops=100", *CLI_ARGS])
    assert code == 0, err
    total = _gpt_params(320, 64, 1, 128, 32)
    assert f"parameters: {total:,}" in out
    assert "MFU ≤" in out and "activations & workspace" in out
    # A budget the step cannot fit: refused with the numbers, by the planner and by training,
    # before anything is allocated.
    tight = "--config.mesh.memory_budget_gib=0.0001"
    code, out, err = _main(["--plan", tight, *CLI_ARGS])
    assert code == 2 and "GiB per device but mesh.memory_budget_gib is 0.0001 GiB" in err
    assert f"parameters {4 * total / 1024:.3f} KiB + optimizer state" in err
    code, _, err = _main([f"--workdir={tmp_path}", tight, *CLI_ARGS])
    assert code == 2 and "GiB per device but mesh.memory_budget_gib is 0.0001" in err
    assert not (tmp_path / "checkpoints").exists()


TOPOLOGIES = [("v5e:2x2", "TPU v5 lite", "v5e"), ("v5p:2x2x1", "TPU v5", "v5p")]


@pytest.mark.parametrize(("topology", "kind", "chip"), TOPOLOGIES)
def test_train_step_compiles_for_a_tpu_slice(topology, kind, chip):
    pytest.importorskip("libtpu", reason="the test extra installs libtpu")
    from lmflax.train import plan

    cfg = _small_cfg(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2})
    p, report = plan.main(cfg, topology=topology)
    assert p.devices == 4 and p.device_kind == kind and p.chip.name == chip
    # Per chip: every matrix is split over fsdp × tensor (4 ways), so parameters take a quarter
    # of their float32 bytes; vectors (biases, norms) are split over one axis or none, which at
    # this tiny width adds about 6%. Adam's two moments take twice that.
    whole = 4 * p.params
    assert whole / 4 <= p.param_bytes < 1.1 * whole / 4
    assert p.opt_state_bytes == pytest.approx(2 * p.param_bytes, rel=1e-3)
    # The TPU compiler's own per-chip argument size agrees with that accounting.
    ours = p.param_bytes + p.opt_state_bytes + p.batch_bytes
    assert ours <= p.argument_bytes < 1.1 * ours
    assert p.activation_bytes > 0 and p.code_bytes > 0
    assert p.peak_bytes < p.chip.hbm_bytes and f"fits the {chip} chip" in report
    print(f"\n{topology}: {report}")


def test_unknown_topology_is_a_config_error():
    pytest.importorskip("libtpu", reason="the test extra installs libtpu")
    from lmflax.train import plan

    with pytest.raises(ConfigError, match="not a TPU slice libtpu knows"):
        plan.topology_devices("v9z:2x2")


# ---------------------------------------------------------------------------------------------
# Real meshes and processes (subprocesses with fake CPU devices)


def _env(data_dir: str, devices: int) -> dict[str, str]:
    env = {**os.environ, "TFDS_DATA_DIR": data_dir, "PYTHONUNBUFFERED": "1"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return env


def _start(args: list[str], data_dir: str, devices: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=_env(data_dir, devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, what: str) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"{what} exited {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}")
    return out, err


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class _Runs:
    """train.py on one process with 4 devices, and on 2 processes × 2 devices, started together
    (they are independent) and awaited by the tests that read them."""

    def __init__(self, root: Path, data_dir: str):
        self.ref, self.multi = root / "one_process", root / "two_processes"
        train = str(ROOT / "train.py")
        addr = f"--coordinator_address=localhost:{_free_port()}"
        self.procs = {
            "ref": _start([train, f"--workdir={self.ref}", *TRAIN_ARGS], data_dir, 4),
            **{
                f"p{i}": _start(
                    [
                        train,
                        f"--workdir={self.multi}",
                        *TRAIN_ARGS,
                        addr,
                        "--num_processes=2",
                        f"--process_id={i}",
                    ],
                    data_dir,
                    2,
                )
                for i in range(2)
            },
        }
        self.outputs: dict[str, tuple[str, str]] = {}

    def wait(self) -> dict[str, tuple[str, str]]:
        for name, proc in self.procs.items():
            if name not in self.outputs:
                self.outputs[name] = _finish(proc, f"train.py ({name})")
        return self.outputs

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    r = _Runs(tmp_path_factory.mktemp("parallel"), data_dir)
    yield r
    r.kill()


def _normalise(spec: list, mesh_shape: dict[str, int]) -> tuple:
    """A PartitionSpec as a tuple of mesh-axis tuples, leaving out axes of size 1."""
    out = []
    for entry in spec:
        axes = entry if isinstance(entry, list) else [entry]
        axes = tuple(a for a in axes if a is not None and mesh_shape[a] > 1)
        out.append(axes or None)
    return tuple(out)


# The default rules for parameters, written out: vocab, heads, kv_heads and mlp over tensor,
# embed over fsdp; everything else replicated. A dimension the mesh axis does not divide stays
# replicated.
PARAM_RULES = {"vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}
PARAM_RULES["embed"] = "fsdp"


@pytest.mark.slow
def test_same_losses_and_rule_shardings_on_every_mesh(runs, data_dir):
    # `runs` starts the train.py processes first: they work while this one does.
    out, _ = _finish(_start([str(WORKER), "meshes"], data_dir, 8), "meshes worker")
    r = json.loads(out.strip().splitlines()[-1])
    losses = r["losses"]
    assert set(losses) == set(MESHES)
    ref = np.asarray(losses["data=8"])
    assert np.all(np.diff(ref[[0, -1]]) != 0)  # training moved
    for name, values in losses.items():
        np.testing.assert_allclose(values, ref, rtol=1e-5, err_msg=name)
    for name, shape in r["mesh_shape"].items():
        for when in ("init", "after"):
            specs = r["shardings"][name][when]
            for path, names in r["logical"].items():
                dims = r["shapes"][path]
                want = []
                for n, size in zip(names, dims):
                    axis = PARAM_RULES.get(n)
                    ok = axis is not None and shape[axis] > 1 and size % shape[axis] == 0
                    want.append((axis,) if ok else None)
                got = _normalise(specs[path], shape)
                assert got == tuple(want), (name, when, path, got, want)
    # Spot checks in plain words: under data=2,fsdp=2,tensor=2 the query kernel [D, N, H] is
    # split over fsdp (D) and tensor (heads); the token table [V, D] over tensor and fsdp.
    spec = r["shardings"]["data=2,fsdp=2,tensor=2"]["after"]
    mesh = r["mesh_shape"]["data=2,fsdp=2,tensor=2"]
    q = "['decoder']['layers_0']['attention']['query']['kernel']"
    assert _normalise(spec[q], mesh) == (("fsdp",), ("tensor",), None)
    assert _normalise(spec["['token_embed']['embedding']"], mesh) == (("tensor",), ("fsdp",))
    data8 = r["shardings"]["data=8"]["after"][q]
    assert all(v is None for v in _normalise(data8, r["mesh_shape"]["data=8"]))

    # Planner under fsdp=8: its per-device bytes are what the devices really hold, and within
    # 10% of the argument bytes of the compiled step's memory analysis.
    p = r["plan"]
    assert p["param_bytes"] == p["real_param_bytes"] < p["whole_param_bytes"] / 4
    assert p["opt_state_bytes"] == p["real_opt_state_bytes"]
    ours = p["param_bytes"] + p["opt_state_bytes"] + p["batch_bytes"]
    assert ours <= p["argument_bytes"] < 1.1 * ours
    # The state is created in its shardings: init's outputs per device are the shards only.
    shards = p["param_bytes"] + p["opt_state_bytes"]
    assert shards <= r["init_output_bytes"] < 1.1 * shards

    # Mesh sizes that do not tile the devices, or a batch the data-parallel size does not
    # divide: exit code 2 naming both numbers.
    cli = r["cli"]
    assert cli["mesh"]["code"] == 2 and "= 3 but there are 8 devices" in cli["mesh"]["stderr"]
    assert cli["batch"]["code"] == 2
    assert "data.batch_size=12" in cli["batch"]["stderr"]
    assert "data-parallel size data×fsdp = 8" in cli["batch"]["stderr"]


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    outputs = runs.wait()
    one, two = _losses(runs.ref), _losses(runs.multi)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-5)
    # Only process 0 logs and writes metrics; checkpoints were written by both, one data-shard
    # position each.
    out1, err1 = outputs["p1"]
    assert "done:" not in out1 and " I " not in err1  # (gloo itself prints its connections)
    assert "joined a 2-process cluster (explicit) as process 0" in outputs["p0"][1]
    assert "done: step 5" in outputs["p0"][0]
    for step in (3, 5):
        data = runs.multi / "checkpoints" / str(step) / "data"
        assert sorted(p.name for p in data.glob("*.json")) == [
            "shard_0-of-2.json",
            "shard_1-of-2.json",
        ]
    meta = json.loads((runs.multi / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert meta["process_count"] == 2 and meta["data_shards"] == 2


@pytest.mark.slow
def test_restore_onto_other_meshes_and_device_counts(runs, data_dir, tmp_path):
    runs.wait()
    four = _start(
        [
            str(WORKER),
            "restore",
            str(runs.ref),
            "3",
            "data=4;fsdp=2,tensor=2",
            str(tmp_path / "four"),
            str(runs.ref),
            str(tmp_path / "four.npz"),
        ],
        data_dir,
        4,
    )
    # On 2 devices in one process, continuing the checkpoint the 2-process run wrote.
    two = _start(
        [
            str(WORKER),
            "restore",
            str(runs.ref),
            "3",
            "fsdp=2;data=2",
            str(tmp_path / "two"),
            str(runs.multi),
            str(tmp_path / "two.npz"),
        ],
        data_dir,
        2,
    )
    r4 = json.loads(_finish(four, "restore on 4 devices")[0].strip().splitlines()[-1])
    r2 = json.loads(_finish(two, "restore on 2 devices")[0].strip().splitlines()[-1])
    assert r4["devices"] == 4 and r2["devices"] == 2
    for r in (r4, r2):
        for mesh, m in r["meshes"].items():
            assert m["shardings_as_requested"], mesh
            assert m["same_keys_as_first"] and m["max_abs_diff_to_first"] == 0.0, mesh
            assert m["meta"]["step"] == 3
    m = r4["meshes"]["fsdp=2,tensor=2"]
    q = "['params']['decoder']['layers_0']['attention']['query']['kernel']"
    assert _normalise(m["specs"][q], m["mesh_shape"]) == (("fsdp",), ("tensor",), None)
    m = r2["meshes"]["data=2"]
    assert all(v is None for v in _normalise(m["specs"][q], m["mesh_shape"]))
    # The same values whatever the mesh or device count.
    a, b = np.load(tmp_path / "four.npz"), np.load(tmp_path / "two.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Training continues as if never interrupted: steps 4 and 5 log the uninterrupted losses.
    ref = _losses(runs.ref)
    for r in (r4, r2):
        assert r["summary"] == {"start_step": 3, "final_step": 5}
        got = {int(k): v for k, v in r["losses"].items()}
        assert sorted(got) == [4, 5]
        np.testing.assert_allclose([got[4], got[5]], [ref[4], ref[5]], rtol=1e-5)
