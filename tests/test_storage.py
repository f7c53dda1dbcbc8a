"""Workdirs as URLs (issue 15): which --workdir values map to which epath paths, and everything
lmflax writes itself (metrics, checksums, config.json, the lock, exports) working on a gs://
bucket held in memory, so no code path assumes pathlib or a local disk. Checkpoint arrays are
written by orbax/tensorstore, which a memory bucket cannot stand in for: the file:// run in
test_reliability.py trains, is killed and resumes through the URL path end to end."""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from unittest import mock

import numpy as np
import pytest
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import stringify_path

from lmflax import storage
from lmflax.config import ConfigError, load_config_file, to_json
from lmflax.train import checkpoint, loop, metrics
from lmflax.train.workdir_lock import LOCK, WorkdirLock, WorkdirLockedError


class _BucketFS(MemoryFileSystem):
    """gs:// in memory, keyed without the scheme like gcsfs, with mtimes like a bucket's."""

    store: dict = {}  # noqa: RUF012 (fsspec's own layout: one store per class)
    pseudo_dirs: list = [""]  # noqa: RUF012

    @classmethod
    def _strip_protocol(cls, path):
        return "/" + stringify_path(path).removeprefix("gs://").strip("/")

    def info(self, path, **kwargs):
        out = super().info(path, **kwargs)
        if out["type"] == "file":
            out["mtime"] = self.store[self._strip_protocol(path)].modified
        return out


class _BucketBackend(backend._FileSystemSpecBackend):
    """epath's own fsspec backend (what gs:// uses with gcsfs), on the memory bucket."""

    def fs(self, path):
        return _BucketFS()

    def glob(self, path):
        return ["gs://" + p.lstrip("/") for p in self.fs(path).glob(os.fspath(path))]


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs:// URLs resolve to an in-memory bucket; the test runs in an empty folder, which must
    stay empty (a pathlib call on a URL would write 'gs:/...' there)."""
    _BucketFS.store.clear()
    _BucketFS.pseudo_dirs[:] = [""]
    monkeypatch.setattr(storage, "_gs_backend_problem", lambda: None)
    monkeypatch.chdir(tmp_path)
    with mock.patch.dict(gpath._PREFIX_TO_BACKEND, {"gs": _BucketBackend()}):
        yield _BucketFS.store
    assert list(tmp_path.iterdir()) == [], "something was written locally instead"


# ---------------------------------------------------------------------------------------------
# which values are workdirs


def test_paths_and_file_urls_are_local_paths(tmp_path):
    assert storage.to_path("runs/x") == epath.Path("runs/x")
    assert storage.is_local(storage.to_path("runs/x"))
    assert storage.to_path(f"file://{tmp_path}/run") == epath.Path(f"{tmp_path}/run")
    assert storage.to_path(f"file://localhost{tmp_path}") == epath.Path(str(tmp_path))
    assert storage.to_path("odd:name/run") == epath.Path("odd:name/run")  # no '://'
    assert storage.absolute(storage.to_path("runs/x")) == epath.Path(os.path.abspath("runs/x"))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("s3://bucket/run", "only to local paths and gs://"),
        ("az://container/run", "only to local paths and gs://"),
        ("hf://org/model", "read-only"),
        ("gcs://bucket/run", "does not know"),
        ("file://server/run", "got host 'server'"),
    ],
)
def test_urls_that_cannot_hold_a_run_are_config_errors_saying_why(value, why):
    with pytest.raises(ConfigError, match=why) as e:
        storage.to_path(value)
    assert value in str(e.value)


def test_gs_needs_gcsfs_and_a_bucket(monkeypatch):
    found = {"tensorflow": None, "gcsfs": None}
    monkeypatch.setattr(storage.importlib.util, "find_spec", lambda name: found.get(name, 1))
    with pytest.raises(ConfigError, match="pip install gcsfs"):
        storage.to_path("gs://bucket/run")
    found["gcsfs"] = object()
    assert str(storage.to_path("gs://bucket/run")) == "gs://bucket/run"
    assert not storage.is_local(storage.to_path("gs://bucket/run"))
    with pytest.raises(ConfigError, match="names no bucket"):
        storage.to_path("gs:///run")


# ---------------------------------------------------------------------------------------------
# what lmflax writes itself, on a bucket


def test_metrics_on_a_bucket_are_whole_records_truncated_on_resume(bucket):
    run = "gs://bucket/run"
    w = metrics.MetricWriter(run, writers="jsonl")
    for step in (1, 2, 3):
        w.write(step, {"loss": float(step)})
    w.write(3, {"accuracy": 0.5}, file="eval_metrics", prefix="eval/")
    w.close()
    # A resumed run from step 2: step 3 goes, and is logged again.
    w = metrics.MetricWriter(run, writers="jsonl")
    w.truncate_after(2)
    w.write(3, {"loss": 30.0})
    got = metrics.read_metrics(f"{run}/metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in got] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert metrics.read_metrics(f"{run}/eval_metrics.jsonl") == []
    assert "/bucket/run/metrics.jsonl" in bucket


def test_tensorboard_on_a_bucket_without_its_gcs_client_names_the_package(bucket, monkeypatch):
    real = metrics.importlib.import_module

    def no_gcs(name, *a):
        if name == "google.cloud.storage":
            raise ImportError("No module named 'google.cloud'")
        return real(name, *a)

    monkeypatch.setattr(metrics.importlib, "import_module", no_gcs)
    with pytest.raises(ConfigError, match="pip install google-cloud-storage"):
        metrics.MetricWriter("gs://bucket/run", writers="jsonl,tensorboard")


def _checkpoint_files(step_dir: epath.Path) -> None:
    (step_dir / "state" / "ocdbt.process_0").mkdir(parents=True)
    (step_dir / "state" / "ocdbt.process_0" / "d0").write_bytes(bytes(range(256)) * 4)
    (step_dir / "meta").mkdir()
    (step_dir / "meta" / "metadata").write_text('{"step": 5}')


def test_checksums_on_a_bucket_verify_and_name_a_changed_file(bucket):
    step_dir = storage.to_path("gs://bucket/run/checkpoints/5")
    _checkpoint_files(step_dir)
    checkpoint.record_checksums(step_dir)
    sums = json.loads((step_dir / checkpoint.CHECKSUMS).read_text())
    assert sorted(sums) == ["meta/metadata", "state/ocdbt.process_0/d0"]
    assert sums["state/ocdbt.process_0/d0"][0] == 1024
    assert checkpoint.verify_checksums(step_dir)
    data = bytearray((step_dir / "state/ocdbt.process_0/d0").read_bytes())
    data[7] ^= 1
    (step_dir / "state/ocdbt.process_0/d0").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointIntegrityError, match="d0 does not match"):
        checkpoint.verify_checksums(step_dir)


def test_a_checksum_entry_leaving_the_checkpoint_is_refused_on_a_bucket(bucket):
    step_dir = storage.to_path("gs://bucket/run/checkpoints/5")
    _checkpoint_files(step_dir)
    (step_dir / checkpoint.CHECKSUMS).write_text(json.dumps({"../../x": [1, "ab"]}))
    with pytest.raises(
        checkpoint.CheckpointIntegrityError, match=re.escape("malformed entry '../../x'")
    ):
        checkpoint.verify_checksums(step_dir)


def test_config_json_is_written_to_and_checked_on_a_bucket(bucket):
    cfg, _ = load_config_file("gpt_tiny")
    workdir = storage.to_path("gs://bucket/run")
    loop._prepare_workdir(workdir, cfg, True)
    assert json.loads((workdir / "config.json").read_text()) == json.loads(to_json(cfg))
    other, _ = load_config_file("bert_tiny")
    with pytest.raises(ConfigError, match="different model config"):
        loop._prepare_workdir(workdir, other, True)


def test_the_lock_on_a_bucket_refuses_a_live_holder_and_is_released(bucket):
    a = WorkdirLock("gs://bucket/run", settle_s=0.01)
    a.acquire()
    record = json.loads(storage.to_path(f"gs://bucket/run/{LOCK}").read_text())
    assert record["pid"] == os.getpid()
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
        WorkdirLock("gs://bucket/run", settle_s=0.01).acquire()
    a.release()
    assert f"/bucket/run/{LOCK}" not in bucket
    b = WorkdirLock("gs://bucket/run", settle_s=0.01)
    b.acquire()
    b.release()


def test_the_lock_of_another_host_that_stopped_refreshing_is_taken_over(bucket, caplog):
    path = storage.to_path(f"gs://bucket/run/{LOCK}")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x"}))
    lock = WorkdirLock("gs://bucket/run", settle_s=0.01)
    with pytest.raises(WorkdirLockedError, match="host elsewhere"):
        lock.acquire()  # refreshed just now: its run may be alive
    old = datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(seconds=3600)
    bucket[f"/bucket/run/{LOCK}"].modified = old
    lock.acquire()
    assert "took over the stale lock" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_bucket_lock_taken_by_another_run_is_noticed_by_the_heartbeat(bucket):
    lock = WorkdirLock("gs://bucket/run", settle_s=0.01, heartbeat_s=0.05)
    lock.acquire()
    try:
        path = storage.to_path(f"gs://bucket/run/{LOCK}")
        path.write_text(json.dumps({"host": "elsewhere", "pid": 7, "token": "theirs"}))
        deadline = time.time() + 10
        while lock.lost is None and time.time() < deadline:
            time.sleep(0.02)
        assert lock.lost is not None and "host elsewhere" in lock.lost
        assert json.loads(path.read_text())["token"] == "theirs"  # not written over
    finally:
        lock.release()


def test_local_staging_copies_a_folder_to_a_bucket(bucket):
    target = storage.to_path("gs://bucket/exports/hf")
    with storage.local_staging(target) as local:
        assert storage.is_local(local)
        (local / "config.json").write_text("{}")
        (local / "sub").mkdir()
        (local / "sub" / "w.bin").write_bytes(b"\x00\x01")
    assert (target / "config.json").read_text() == "{}"
    assert (target / "sub" / "w.bin").read_bytes() == b"\x00\x01"


def test_checksums_are_hashed_on_process_0_only_and_its_verdict_shared(tmp_path, monkeypatch):
    step_dir = storage.to_path(tmp_path / "5")
    _checkpoint_files(step_dir)
    checkpoint.record_checksums(step_dir)
    hashed, sent = [], []
    real_sha = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda p: hashed.append(p) or real_sha(p))
    monkeypatch.setattr(checkpoint.jax, "process_count", lambda: 2)
    verdict_of_0 = np.int32(1)

    def broadcast(x):  # what process 0 sends; the value each process passes is recorded
        sent.append(int(x))
        return verdict_of_0 if checkpoint.jax.process_index() else x

    monkeypatch.setattr(checkpoint.multihost_utils, "broadcast_one_to_all", broadcast)
    monkeypatch.setattr(checkpoint.jax, "process_index", lambda: 1)
    checkpoint.verify_on_one_process(step_dir)
    assert hashed == []  # process 1 read nothing
    verdict_of_0 = np.int32(0)
    with pytest.raises(checkpoint.CheckpointIntegrityError, match="on process 0"):
        checkpoint.verify_on_one_process(step_dir)
    assert hashed == []
    monkeypatch.setattr(checkpoint.jax, "process_index", lambda: 0)
    checkpoint.verify_on_one_process(step_dir)
    assert len(hashed) == 2 and sent[-1] == 1
    (step_dir / "meta" / "metadata").write_text('{"step": 6}')
    with pytest.raises(checkpoint.CheckpointIntegrityError, match="metadata does not match"):
        checkpoint.verify_on_one_process(step_dir)
    assert sent[-1] == 0  # process 0 tells the others
