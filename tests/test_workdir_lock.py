"""The workdir lock (issue 17): O_EXCL creation, refusals naming the holder, stale takeover on
this host (pid gone or reused) and from another host (no heartbeat), and a takeover race between
real processes. train.py's refusal is in test_reliability.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmflax.train import workdir_lock
from lmflax.train.workdir_lock import LOCK, WorkdirLock, WorkdirLockedError

from .conftest import ROOT


def _plant(workdir: Path, **holder) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK
    path.write_text(json.dumps({"started": "2026-01-01 00:00:00 UTC", **holder}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_live_holder_and_is_released(tmp_path):
    with WorkdirLock(tmp_path) as held:
        holder = json.loads((tmp_path / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(WorkdirLockedError) as e:
            WorkdirLock(tmp_path).acquire()
        msg = str(e.value)
        assert str(tmp_path) in msg and f"pid {os.getpid()}" in msg
        assert f"host {socket.gethostname()}" in msg and "started " in msg
        assert held.held
    assert not (tmp_path / LOCK).exists()


def test_stale_lock_on_this_host_is_taken_over(tmp_path, caplog):
    pid = _dead_pid()
    _plant(tmp_path, host=socket.gethostname(), pid=pid, proc_start="1")
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert f"took over the stale lock of workdir {tmp_path}" in caplog.text
    assert f"pid {pid}" in caplog.text and "is gone" in caplog.text


def test_a_reused_pid_is_not_a_live_holder(tmp_path, caplog):
    """Our own pid with another process start time: the holder died and its pid was reused."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("process start times come from /proc")
    _plant(tmp_path, host=socket.gethostname(), pid=os.getpid(), proc_start="0")
    with WorkdirLock(tmp_path):
        pass
    assert "took over the stale lock" in caplog.text


def test_another_hosts_lock_is_stale_only_without_heartbeat(tmp_path, monkeypatch):
    path = _plant(tmp_path, host="some-other-host", pid=1)
    with pytest.raises(WorkdirLockedError, match="host some-other-host, pid 1"):
        WorkdirLock(tmp_path).acquire()
    old = time.time() - workdir_lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    with WorkdirLock(tmp_path):
        assert json.loads(path.read_text())["host"] == socket.gethostname()


def test_the_holder_refreshes_its_lock(tmp_path):
    lock = WorkdirLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.5)
        assert time.time() - os.stat(lock.path).st_mtime < 100
    finally:
        lock.release()


_CONTENDER = """
import importlib.util, os, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("wl", sys.argv[1])
wl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wl)
go = Path(sys.argv[3])
Path(sys.argv[3] + "." + str(os.getpid())).write_text("")  # imported: ready
while not go.exists():
    time.sleep(0.001)
lock = wl.WorkdirLock(sys.argv[2])
try:
    lock.acquire()
except wl.WorkdirLockedError as e:
    print("refused", e)
else:
    print("won")
    time.sleep(1.5)
    lock.release()
"""


def test_of_many_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    workdir = tmp_path / "run"
    _plant(workdir, host=socket.gethostname(), pid=_dead_pid())
    go = tmp_path / "go"
    module = ROOT / "lmflax" / "train" / "workdir_lock.py"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(module), str(workdir), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    # Every contender has imported the module (which imports jax and orbax through lmflax.train)
    # before any starts, so they really race.
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.*"))) < len(procs) and time.time() < deadline:
        time.sleep(0.05)
    go.write_text("")
    results = [p.communicate(timeout=60) for p in procs]
    outs = [out.strip() for out, _ in results]
    winners = [p.pid for p, out in zip(procs, outs) if out == "won"]
    assert len(winners) == 1, results
    refused = [out for out in outs if out.startswith("refused")]
    assert len(refused) == 7, results
    assert all(f"pid {winners[0]}" in out for out in refused), refused
    assert not (workdir / LOCK).exists()
