"""What happens when things go wrong: strict inputs, bad data, NaNs, crashes during saves,
preemption, exact resume, corrupted checkpoints and retention (issue 7).

Subprocess tests drive train.py with real signals; library tests use the Checkpointer and the
pure train step directly.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lmflax.config import load_config_file, override
from lmflax.train import Run
from lmflax.train.checkpoint import (
    CHECKSUMS,
    Checkpointer,
    CheckpointIntegrityError,
    verify_checksums,
)
from lmflax.train.metrics import read_metrics

from .conftest import ROOT, run_train

TINY = [
    "--config.model.num_layers=2",
    "--config.model.d_model=64",
    "--config.model.d_ff=128",
    "--config.data.seq_len=64",
    "--config.data.batch_size=8",
    "--config.train.sample_tokens=0",
    "--config.data.eval_split=",
    "--config.train.log_every=1",
    "--config.model.dropout_rate=0.1",
    "--config.model.attention_dropout_rate=0.1",
]

# Most tests here run train.py in subprocesses.
pytestmark = pytest.mark.slow


def _env(data_dir: str) -> dict[str, str]:
    return {**os.environ, "TFDS_DATA_DIR": data_dir, "PYTHONUNBUFFERED": "1"}


def _popen(args: list[str], data_dir: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl")}


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _params(step_dir: Path) -> dict:
    return ocp.PyTreeCheckpointer().restore(step_dir / "state")["params"]


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"train.py exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}"
            )
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# 1. strict configs (more in test_config.py)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--config.mesh.data=2"], "= 2 but there are 1 devices"),
        (
            ["--config.data.batch_size=6", "--config.optimizer.grad_accum_steps=4"],
            "divisible by optimizer.grad_accum_steps",
        ),
        (["--config.optimizer.learning_rate=0"], "learning_rate must be > 0"),
        (["--config.model.num_kv_heads=3"], "must divide model.num_heads"),
        (
            ["--config.data.seq_len=257"],
            "longer than the model's learned positions (model.max_len=256)",
        ),
    ],
)
def test_impossible_values_exit_2_before_compiling(args, expected, data_dir, tmp_path):
    proc = run_train(
        [f"--workdir={tmp_path}", *args], data_dir, check=False, env={"JAX_LOG_COMPILES": "1"}
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr
    assert "Compiling" not in proc.stderr and "Finished XLA compilation" not in proc.stderr


def test_validation_itself_is_fast():
    """The checks take milliseconds; the CLI's wall time is dominated by importing JAX/Flax."""
    from lmflax.config import apply_overrides
    from lmflax.train import resolve

    cfg, _ = load_config_file(None)
    t0 = time.perf_counter()
    for _ in range(100):
        resolve(apply_overrides(cfg, ["train.steps=5", "model.num_heads=4"]))
    per_call = (time.perf_counter() - t0) / 100
    print(f"validate + overrides: {per_call * 1e3:.2f} ms")


# ---------------------------------------------------------------------------------------------
# 2. bad data


def test_missing_dataset_and_oversized_tokenizer_are_clear_errors(data_dir, tmp_path):
    proc = run_train(
        [f"--workdir={tmp_path / 'a'}", "--config.data.dataset=not_a_dataset"],
        data_dir,
        check=False,
    )
    # exit 2 (nothing was started: the config names no dataset), before the workdir is made
    assert proc.returncode == 2 and "'not_a_dataset' is not a dataset TFDS knows" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "a").exists()
    # A 100-token model with a byte-level tokenizer (256 byte tokens at least): refused, named,
    # before the workdir is made or a tokenizer trained (issue 17).
    proc = run_train(
        [f"--workdir={tmp_path / 'b'}", "--config.model.vocab_size=100"], data_dir, check=False
    )
    assert proc.returncode == 2 and "model.vocab_size=100" in proc.stderr, proc.stderr[-2000:]
    assert "at least 258 tokens" in proc.stderr and not (tmp_path / "b").exists()


def test_invalid_utf8_names_the_record(tmp_path):
    import grain

    from lmflax.data import pipeline
    from lmflax.data.sources import DataError
    from lmflax.data.tokenizers import train_tokenizer

    cfg, _ = load_config_file(None)
    tok = train_tokenizer("bpe", iter(["good text"] * 20), 300)
    records = [{"text": b"fine"}, {"text": b"fine too"}, {"text": b"bro\xffken"}]
    ds = grain.MapDataset.source(records).map_with_index(
        pipeline._tokenize(cfg.data, lambda ids: {"ids": ids}, tok)
    )
    assert ds[0]["ids"]
    with pytest.raises(DataError, match=r"record 2, feature 'text' is not valid UTF-8"):
        list(ds.to_iter_dataset())


def test_long_documents_are_split_across_rows_not_dropped(data_dir):
    """Documents longer than seq_len continue in the next rows (documented packing)."""
    from lmflax.data import pipeline, sources

    cfg, _ = load_config_file(None)
    cfg = override(cfg, {"data.data_dir": data_dir, "data.seq_len": 16, "data.shuffle_buffer": 1})
    tok = pipeline.tokenizer_for(cfg.data, cfg.model.vocab_size)
    first_doc = pipeline.documents(cfg.data, "train", seed=0)[0]["text"].decode()
    ids = tok.encode(first_doc)
    assert len(ids) > 3 * 16
    it = iter(pipeline.causal_lm_dataset(cfg, tok, "train", seed=0, batch_size=1))
    rows = [next(it)["targets"][0] for _ in range(len(ids) // 16)]
    it.close()
    np.testing.assert_array_equal(
        np.concatenate(rows)[: len(ids)], np.asarray(ids, np.int32)[: 16 * len(rows)][: len(ids)]
    )
    assert cfg.data.dataset == sources.EMBEDDED


# ---------------------------------------------------------------------------------------------
# 3. NaN / Inf


def test_nonfinite_stops_the_run_naming_the_step(data_dir, tmp_path):
    proc = run_train(
        [
            f"--workdir={tmp_path}",
            *TINY,
            "--config.train.steps=30",
            "--config.train.checkpoint_every=1",
            "--config.optimizer.learning_rate=1e30",
            "--config.optimizer.warmup_steps=0",
            "--config.optimizer.clip_norm=0",
        ],
        data_dir,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    msg = proc.stderr[proc.stderr.index("error: non-finite") :]
    bad = int(msg.split("at step ")[1].split()[0].rstrip(";"))
    assert bad >= 1
    # Every checkpoint predates the bad step, and every saved value is finite.
    steps = _steps(tmp_path)
    assert steps and max(steps) < bad
    params = _params(tmp_path / "checkpoints" / str(max(steps)))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_skip_policy_leaves_state_bit_identical_and_counts():
    from lmflax.train import Trainer

    cfg, _ = load_config_file(None)
    cfg = override(
        cfg,
        {
            "model.vocab_size": 64,
            "model.num_layers": 1,
            "model.d_model": 32,
            "model.d_ff": 64,
            "data.batch_size": 4,
            "data.seq_len": 8,
            "mesh.data": 1,
            "train.nonfinite": "skip",
        },
    )
    tr = Trainer.create(cfg)
    step = tr.jit_train_step()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (4, 9)).astype(np.int32)
    batch = {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)),
        "segment_ids": np.ones((4, 8), np.int32),
        "weights": np.ones((4, 8), np.float32),
    }
    bad = dict(batch, weights=np.full((4, 8), np.nan, np.float32))
    with tr.context():
        s1, m1 = step(tr.state, tr.global_batch(batch), jax.random.key(0))
        before = jax.device_get(s1.arrays())
        s2, m2 = step(s1, tr.global_batch(bad), jax.random.key(1))
        after = jax.device_get(s2.arrays())
    assert float(m1["skipped"]) == 0.0 and float(m2["skipped"]) == 1.0
    assert int(after["step"]) == int(before["step"]) + 1
    for a, b in zip(
        jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
        jax.tree.leaves(after["params"]) + jax.tree.leaves(after["opt_state"]),
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_skip_policy_run_completes_and_reports_skips(data_dir, tmp_path):
    # learning_rate=1e30: step 1's update is finite but huge, every later loss is NaN and those
    # steps are skipped. The run completes and saves, but a final loss of NaN is never exit 0.
    proc = run_train(
        [
            f"--workdir={tmp_path}",
            *TINY,
            "--config.train.steps=8",
            "--config.train.checkpoint_every=4",
            "--config.optimizer.learning_rate=1e30",
            "--config.optimizer.warmup_steps=0",
            "--config.optimizer.clip_norm=0",
            "--config.train.nonfinite=skip",
        ],
        data_dir,
        check=False,
    )
    assert proc.returncode == 1 and "final logged loss is nan" in proc.stderr, proc.stderr[-2000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["skipped_total"] == sum(r["skipped"] for r in records) > 0
    params = _params(tmp_path / "checkpoints" / "8")
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# 4-6. crashes, preemption, exact resume

RESUME = [*TINY, "--config.train.steps=40", "--config.train.checkpoint_every=20"]


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory) -> Path:
    """40 steps, never interrupted: the reference for the resume tests."""
    workdir = tmp_path_factory.mktemp("straight")
    run_train([f"--workdir={workdir}", *RESUME], data_dir)
    return workdir


def test_kill_after_checkpoint_resumes_bit_identical(straight_run, data_dir, tmp_path):
    """40 straight vs 20 + kill -9 + the rest: identical losses and bit-identical parameters.
    The workdir is given as a file:// URL (parsed by lmflax.storage; the straight run and the
    other tests here use a plain path), and `Run.open` reads the run back from the URL."""
    workdir = f"file://{tmp_path}"
    proc = _popen([f"--workdir={workdir}", *RESUME], data_dir)
    _wait_for(lambda: (tmp_path / "checkpoints" / "20").is_dir(), proc, "checkpoint 20")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 20 <= max(_losses(tmp_path)) < 40, (
        "the run ended before it was killed; nothing was tested"
    )
    resumed = run_train([f"--workdir={workdir}", *RESUME], data_dir)
    assert "resumed from" in resumed.stderr and "at step 20" in resumed.stderr
    assert _losses(tmp_path) == _losses(straight_run)
    a, b = _params(tmp_path / "checkpoints" / "40"), _params(straight_run / "checkpoints" / "40")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    run = Run.open(workdir, local_devices=True)
    assert run.step == 40
    for x, y in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_sigterm_saves_exits_0_and_the_rerun_continues(straight_run, data_dir, tmp_path):
    proc = _popen([f"--workdir={tmp_path}", *RESUME], data_dir)
    _wait_for(
        lambda: (tmp_path / "metrics.jsonl").exists() and len(_losses(tmp_path)) >= 5,
        proc,
        "step 5",
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 5 <= stopped < 40 and stopped in _steps(tmp_path)
    resumed = run_train([f"--workdir={tmp_path}", *RESUME], data_dir)
    assert f"at step {stopped}" in resumed.stderr
    assert _losses(tmp_path) == _losses(straight_run)


def test_kill_during_a_save_keeps_the_previous_checkpoint(data_dir, tmp_path):
    """kill -9 while checkpoint 2+ is being written: the unfinished directory is never taken for
    a finished one, and the rerun resumes from the last finished checkpoint."""
    args = [
        f"--workdir={tmp_path}",
        *TINY,
        "--config.train.steps=200",
        "--config.train.checkpoint_every=1",
        "--config.model.vocab_size=2048",
        "--config.train.keep_checkpoints=2",
    ]
    proc = _popen(args, data_dir)
    ckpts = tmp_path / "checkpoints"

    def mid_save() -> bool:
        if not ckpts.is_dir():
            return False
        names = [p.name for p in ckpts.iterdir()]
        return any("tmp" in n for n in names) and any(n.isdigit() for n in names)

    _wait_for(mid_save, proc, "a save in progress after a finished one")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    finished = _steps(tmp_path)
    unfinished = [p.name for p in ckpts.iterdir() if not p.name.isdigit()]
    assert finished and unfinished, (finished, unfinished)
    for s in finished:  # each finished checkpoint has its checksums, and they verify
        assert verify_checksums(ckpts / str(s)), s
    resumed = run_train(
        [*args[:-4], "--config.train.steps=" + str(max(finished) + 2), *args[-3:]], data_dir
    )
    assert f"at step {max(finished)}" in resumed.stderr
    assert not [p for p in ckpts.iterdir() if "tmp" in p.name]


def test_failed_async_save_surfaces_and_earlier_checkpoints_survive(data_dir, tmp_path):
    """A save that fails in the background (files capped at 256 KiB: EFBIG, like a full disk)
    stops the run with a message and exit 1; checkpoints saved before it are intact."""
    base = [f"--workdir={tmp_path}", *TINY, "--config.train.checkpoint_every=10"]
    run_train([*base, "--config.train.steps=20"], data_dir)
    sums_before = {
        s: (tmp_path / "checkpoints" / str(s) / CHECKSUMS).read_text() for s in _steps(tmp_path)
    }

    def cap_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *base, "--config.train.steps=40"],
        cwd=ROOT,
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=cap_files,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "saving a checkpoint failed" in proc.stderr and "File too large" in proc.stderr
    assert "Finished checkpoints are intact: [10, 20]" in proc.stderr
    assert {
        s: (tmp_path / "checkpoints" / str(s) / CHECKSUMS).read_text() for s in _steps(tmp_path)
    } == sums_before
    again = run_train([*base, "--config.train.steps=40"], data_dir)
    assert "at step 20" in again.stderr and _steps(tmp_path)[-1] == 40


# ---------------------------------------------------------------------------------------------
# 7-8. integrity and retention (library level)


class _Iter:
    """Stands in for `lmflax.data.shards.ShardedBatches` with one data shard: a JSON-able
    position per shard."""

    num_shards, shards, writes = 1, (0,), (0,)

    def __init__(self, n: int = 0):
        self.n = n

    def get_state(self) -> dict:
        return {0: {"n": self.n}}

    def set_state(self, states: dict) -> None:
        self.n = states[0]["n"]


def _values(step: int) -> jax.Array:
    # Random values: constant arrays compress to almost nothing and leave no file to damage.
    return jax.random.normal(jax.random.key(step), (64, 64))


def _save_steps(directory: Path, steps: list[int], **kw) -> Checkpointer:
    ck = Checkpointer(directory, keep=kw.pop("keep", 5), **kw)
    for s in steps:
        ck.save(s, {"w": _values(s)}, _Iter(s), {"step": s}, force=True)
    ck.wait()
    return ck


def _abstract():
    return {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_is_refused_and_the_previous_one_restored(tmp_path, damage, caplog):
    _save_steps(tmp_path, [1, 2]).close()
    step_dir = tmp_path / "2"
    victim = max(
        (p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS),
        key=lambda p: p.stat().st_size,
    )
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.unlink()
    ck = Checkpointer(tmp_path, keep=5)
    it = _Iter()
    step, arrays, meta = ck.restore_latest(_abstract(), it)
    assert step == 1 and it.n == 1 and meta["step"] == 1
    np.testing.assert_array_equal(np.asarray(arrays["w"]), np.asarray(_values(1)))
    assert list(tmp_path.glob("2.corrupt-*")), "the damaged checkpoint must be kept aside"
    assert "damaged" in caplog.text and "fell back to checkpoint step 1" in caplog.text
    ck.close()


def test_no_verifiable_checkpoint_is_refused(tmp_path):
    _save_steps(tmp_path, [1]).close()
    victim = next(
        p for p in (tmp_path / "1" / "state").rglob("*") if p.is_file() and p.stat().st_size > 1000
    )
    victim.write_bytes(b"\0" * victim.stat().st_size)
    ck = Checkpointer(tmp_path, keep=5)
    with pytest.raises(CheckpointIntegrityError, match="no checkpoint verifies"):
        ck.restore_latest(_abstract(), _Iter())
    ck.close()


def test_retention_keeps_newest_n_plus_every_kth(tmp_path):
    ck = _save_steps(tmp_path, list(range(10, 101, 10)), keep=2, keep_every=30)
    assert ck.all_steps() == [30, 60, 90, 100]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["100", "30", "60", "90"]
    assert all(json.loads((tmp_path / s / CHECKSUMS).read_text()) for s in ["30", "100"])
    ck.close()


def test_unusable_workdir_is_reported_at_startup(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_train([f"--workdir={blocker / 'run'}", *TINY], data_dir, check=False)
    assert proc.returncode == 1 and "is not writable" in proc.stderr
    # A model whose checkpoints cannot fit on this disk (traced, never allocated).
    proc = run_train(
        [
            f"--workdir={tmp_path / 'big'}",
            "--config.model.d_model=16384",
            "--config.model.d_ff=65536",
            "--config.model.num_layers=64",
            "--config.model.num_heads=64",
            "--config.model.vocab_size=65536",
        ],
        data_dir,
        check=False,
    )
    assert proc.returncode == 1 and "GiB free but checkpoints need about" in proc.stderr
    assert not (tmp_path / "big" / "checkpoints").exists() or not _steps(tmp_path / "big")


# ---------------------------------------------------------------------------------------------
# issue 17: one writer per workdir, no unverified restore, checksums with no gap, disk full,
# SIGTERM after the step in flight


def test_a_second_run_on_a_workdir_is_refused_and_a_stale_lock_taken_over(data_dir, tmp_path):
    import socket

    args = [f"--workdir={tmp_path}", *TINY, "--config.train.steps=100000"]
    first = _popen(args, data_dir)
    try:
        _wait_for(
            lambda: (tmp_path / "metrics.jsonl").exists() and len(_losses(tmp_path)) >= 1,
            first,
            "the first run's first step",
        )
        config_before = (tmp_path / "config.json").read_text()
        second = run_train(
            [*args[:-1], "--config.train.steps=5", "--config.optimizer.learning_rate=0.5"],
            data_dir,
            check=False,
            timeout=120,
        )
        assert second.returncode in (1, 2), second.stderr[-3000:]
        msg = second.stderr[second.stderr.index("error: ") :]
        assert str(tmp_path) in msg and f"pid {first.pid}" in msg
        assert f"host {socket.gethostname()}" in msg and "started 20" in msg
        assert "Traceback" not in second.stderr
        # Nothing of the refused run reached the workdir.
        assert (tmp_path / "config.json").read_text() == config_before
        steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
        assert len(steps) == len(set(steps))
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert (tmp_path / "lmflax.lock").exists(), "kill -9 leaves the lock behind"
    third = run_train([*args[:-1], "--config.train.steps=3"], data_dir)
    assert "took over the stale lock" in third.stderr and f"pid {first.pid}" in third.stderr
    assert not (tmp_path / "lmflax.lock").exists(), "a finished run releases its lock"


def _damage(step_dir: Path) -> None:
    """Flips one byte of the checkpoint's largest array file (still loadable, different)."""
    victim = max(
        (p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS),
        key=lambda p: p.stat().st_size,
    )
    data = victim.read_bytes()
    victim.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])


def _damage_harmlessly(step_dir: Path) -> None:
    """Appends a byte to the checkpoint's largest array file: its checksum no longer matches,
    but the arrays read back unchanged (readers take byte ranges), so a run restored from it
    with verification off trains on sane values. (A flipped byte can decode to NaNs, which the
    restored run then rightly refuses to apply.)"""
    victim = max(
        (p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS),
        key=lambda p: p.stat().st_size,
    )
    with open(victim, "ab") as f:
        f.write(b"\0")


def test_no_verifiable_checkpoint_stays_refused_until_asked_and_then_loads(tmp_path, caplog):
    """verify_checkpoints=false, the advice of 'no checkpoint verifies', loads the newest
    moved-aside checkpoint, loudly; a rerun without it refuses again instead of starting over."""
    _save_steps(tmp_path, [1, 2]).close()
    _damage(tmp_path / "1")
    _damage(tmp_path / "2")
    for _ in range(2):  # the second time both are already moved aside
        ck = Checkpointer(tmp_path, keep=5)
        with pytest.raises(CheckpointIntegrityError) as e:
            ck.restore_latest(_abstract(), _Iter())
        ck.close()
        assert "no checkpoint verifies" in str(e.value)
        assert "--config.train.verify_checkpoints=false" in str(e.value)
        assert len(list(tmp_path.glob("*.corrupt-*"))) == 2
    ck = Checkpointer(tmp_path, keep=5, verify=False)
    it = _Iter()
    step, arrays, meta = ck.restore_latest(_abstract(), it)
    ck.close()
    assert step == 2 and meta["step"] == 2 and it.n == 2
    assert "UNVERIFIED" in caplog.text
    diff = np.asarray(arrays["w"]) != np.asarray(_values(2))
    assert 0 < diff.sum() <= 2, "the flipped byte is what was loaded (unverified)"


def test_verify_checkpoints_false_resumes_the_run_and_truncates_nothing(
    data_dir, tmp_path, monkeypatch
):
    from lmflax.train import Run

    base = [f"--workdir={tmp_path}", *TINY, "--config.train.checkpoint_every=5"]
    run_train([*base, "--config.train.steps=10"], data_dir)
    for s in _steps(tmp_path):
        _damage_harmlessly(tmp_path / "checkpoints" / str(s))
    # Opening the run (eval, generate) verifies too, and moves nothing.
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    with pytest.raises(CheckpointIntegrityError, match=r"checkpoint step 10 .* is damaged"):
        Run.open(tmp_path)
    assert _steps(tmp_path) == [5, 10]
    metrics = (tmp_path / "metrics.jsonl").read_text()
    for _ in range(2):
        proc = run_train([*base, "--config.train.steps=12"], data_dir, check=False)
        assert proc.returncode == 1 and "no checkpoint verifies" in proc.stderr
        assert (tmp_path / "metrics.jsonl").read_text() == metrics
    proc = run_train(
        [*base, "--config.train.steps=12", "--config.train.verify_checkpoints=false"], data_dir
    )
    assert "UNVERIFIED" in proc.stderr and "at step 10" in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text().startswith(metrics)
    assert sorted(_losses(tmp_path)) == list(range(1, 13))


def test_damaged_checksum_file_falls_back_like_any_damaged_file(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2]).close()
    (tmp_path / "2" / CHECKSUMS).write_text('{"state/x": [1, "ab"')  # cut short
    ck = Checkpointer(tmp_path, keep=5)
    step, arrays, _ = ck.restore_latest(_abstract(), _Iter())
    ck.close()
    assert step == 1 and list(tmp_path.glob("2.corrupt-*"))
    assert "not valid JSON" in caplog.text
    np.testing.assert_array_equal(np.asarray(arrays["w"]), np.asarray(_values(1)))


def test_a_checkpoint_is_finished_only_with_its_checksums(tmp_path, caplog):
    """Sums are written in orbax's commit step: a step directory gets its final name with them
    (nothing records them later), and one without them is not restored."""
    ck = Checkpointer(tmp_path, keep=5)
    for s in [1, 2]:
        ck.save(s, {"w": _values(s)}, _Iter(s), {"step": s}, force=True)
        ck.manager.wait_until_finished()  # orbax's own wait: no lmflax step after it
        assert (tmp_path / str(s) / CHECKSUMS).is_file(), f"step {s} finished without sums"
    ck.close()
    (tmp_path / "2" / CHECKSUMS).unlink()
    ck = Checkpointer(tmp_path, keep=5)
    step, _, _ = ck.restore_latest(_abstract(), _Iter())
    ck.close()
    assert step == 1 and "lmflax_checksums.json is missing" in caplog.text


def test_disk_check_counts_only_new_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from lmflax.train.loop import _check_disk

    abstract = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}  # 4 MiB
    ckpts = tmp_path / "checkpoints"
    (ckpts / "10").mkdir(parents=True)
    (ckpts / "20.orbax-checkpoint-tmp").mkdir()
    (ckpts / "20.orbax-checkpoint-tmp" / "part").write_bytes(b"\0" * (3 << 20))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, 2 << 20))
    # keep=1: checkpoint 10 stays until the next one (4 MiB) is finished; 3 MiB of the unfinished
    # save are removed before saving: 2 + 3 MiB free for 4 MiB.
    _check_disk(tmp_path, abstract, keep=1)
    with pytest.raises(OSError, match=r"need about 8\.0 MiB more"):
        _check_disk(tmp_path, abstract, keep=2)  # 2 x 4 MiB new


def _can_mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    if ok:
        subprocess.run(["umount", str(path)], check=True)
    return ok


def test_disk_full_names_the_finished_checkpoints_and_a_rerun_fits(data_dir, tmp_path):
    """On a small tmpfs: the save that fills the disk stops the run with one message listing the
    checkpoint that is on disk; with space freed, the rerun's space check counts only new space
    (not checkpoint 10, nor the unfinished save it removes) and the run continues."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("needs permission to mount a tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8500k", "tmpfs", str(disk)], check=True)
    try:
        work = disk / "run"
        base = [
            f"--workdir={work}",
            *TINY,
            "--config.train.checkpoint_every=10",
            "--config.train.keep_checkpoints=1",
        ]
        run_train([*base, "--config.train.steps=10"], data_dir)
        filler = disk / "filler"
        proc = _popen([*base, "--config.train.steps=40"], data_dir)
        _wait_for(lambda: max(_losses(work), default=0) >= 11, proc, "step 11")
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write_bytes(b"\0" * (free - (1 << 20)))  # 1 MiB left: too little for a checkpoint
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        assert "No space left on device" in err
        assert "Finished checkpoints are intact: [10]" in err and "The disk is full" in err
        assert "Traceback" not in err and len(err.splitlines()) < 80, err[-5000:]
        filler.unlink()
        again = run_train([*base, "--config.train.steps=20"], data_dir)
        assert "at step 10" in again.stderr and _steps(work) == [20]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_the_loop_stays_one_step_ahead_of_the_device(data_dir, tmp_path, monkeypatch):
    """A signal is handled when Python next runs, so SIGTERM is honoured after the step in flight
    only if Python never queues more steps than that: without the wait, JAX's asynchronous
    dispatch let the loop run up to a log step (or the runtime's queue limit) ahead."""
    from lmflax.config import apply_overrides
    from lmflax.train import loop, trainer

    outputs: list = []
    depth: list[int] = []
    jit_train_step = trainer.Trainer.jit_train_step

    def counting(self):
        step_fn = jit_train_step(self)

        def step(state, batch, key):
            state, metrics = step_fn(state, batch, key)
            outputs.append(metrics["skipped"])
            depth.append(sum(not x.is_ready() for x in outputs))
            return state, metrics

        return step

    monkeypatch.setattr(trainer.Trainer, "jit_train_step", counting)
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    cfg, _ = load_config_file(None)
    overrides = [a.removeprefix("--config.") for a in TINY if "d_model" not in a]
    cfg = apply_overrides(
        cfg,
        [
            *overrides,
            "model.d_model=256",  # steps long enough that dispatching is much faster
            "model.d_ff=1024",
            "data.data_dir=" + data_dir,
            "train.log_every=50",
            "train.steps=30",
            "train.checkpoint_every=0",
            "train.progress=false",
        ],
    )
    loop.run(cfg, tmp_path)
    assert len(depth) == 30 and max(depth) <= 2, depth


def _unretrieved_gather_failure(filename: str) -> None:
    """Leaves an asyncio gather future whose exception nobody retrieves, raised by code that
    claims to live in `filename`, and collects it: asyncio then logs 'exception was never
    retrieved' with that traceback (what orbax's write futures do after a failed save)."""
    import asyncio
    import gc

    code = compile(
        "async def write():\n    raise ValueError('No space left on device')\n", filename, "exec"
    )
    space: dict = {}
    exec(code, space)
    loop = asyncio.new_event_loop()
    try:
        future = loop.run_until_complete(_gather_unawaited(space["write"]))
        loop.run_until_complete(asyncio.sleep(0))
        del future
        gc.collect()
    finally:
        loop.close()


async def _gather_unawaited(write):
    import asyncio

    future = asyncio.gather(write())
    await asyncio.sleep(0.01)  # it fails; nobody looks at it
    return future


def test_orbax_unretrieved_write_failures_stay_out_of_the_log(tmp_path, caplog):
    """After a failed save, asyncio's 'exception was never retrieved' records for orbax's write
    futures go to lmflax's DEBUG log, not the screen; the same record from other code still
    shows."""
    Checkpointer(tmp_path / "ckpt", keep=1)  # installs lmflax's quieting of orbax
    caplog.set_level(logging.ERROR, logger="asyncio")
    _unretrieved_gather_failure(os.path.join(os.sep, "site", "orbax", "checkpoint", "write.py"))
    assert not [r for r in caplog.records if r.name == "asyncio"]
    _unretrieved_gather_failure(os.path.join(os.sep, "site", "elsewhere", "write.py"))
    shown = [r for r in caplog.records if r.name == "asyncio"]
    assert shown and "never retrieved" in shown[0].getMessage()
