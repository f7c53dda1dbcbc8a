"""One writer per workdir: `workdir/lmflax.lock`, taken by process 0 of a run at start-up.

The lock is a small JSON file created with O_CREAT | O_EXCL, which is atomic on local disks and
on the shared file systems runs use (NFSv3+, Lustre, GPFS, Filestore): of two runs that start at
once exactly one creates it. It names its holder (host, pid, the process's start time, when the
lock was taken) and is removed when the run ends, however it ends short of being killed.

A lock left by a run that is gone is stale and is taken over, with a warning:
- same host: the holder's pid is gone (or was reused: its start time differs);
- another host (its pid cannot be checked from here): the holder touches the lock file every
  `HEARTBEAT_S` seconds; a lock not touched for `STALE_AFTER_S` seconds (by the file system's
  clock, compared with a file this process has just written) is stale.
Takeovers are serialised by a second O_EXCL file, so two runs that both find a stale lock cannot
both take it.

On an object store (a gs:// workdir) there is no O_EXCL and no utime: the lock is advisory. A run
refuses a lock another live run holds (judged as above: same host and pid alive, or refreshed
within `STALE_AFTER_S` by the store's clock), writes its own record, waits `SETTLE_S` and reads
it back; it holds the lock only if the record is still its own (of two writes the later wins).
Both pass only if one run's existence check and write are over `SETTLE_S` apart, which is why it
is advisory; the heartbeat rewrites the record (that moves its mtime), and a heartbeat that finds
another run's record marks the lock lost, which stops the run at its next log step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from etils import epath

from lmflax import storage

log = logging.getLogger(__name__)

LOCK = "lmflax.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # another host's lock untouched this long is stale
_TAKEOVER_STALE_S = 60.0  # a takeover marker older than this was left by a killed process
SETTLE_S = 2.0  # object stores: how long a written lock record must survive to count as held


class WorkdirLockedError(OSError):
    """Another run holds the workdir (train.py exits 1 with the message)."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has finished


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _proc_start(pid)
    if Path("/proc/self/stat").exists():
        if now is None:  # gone meanwhile, or a zombie
            return False
        return start is None or now == start
    return True


def _holder_text(h: dict[str, Any]) -> str:
    return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {h.get('started', '?')}"


class WorkdirLock:
    """The lock on one workdir. `acquire()` takes it or raises WorkdirLockedError naming the
    holder; `release()` removes it (only if still ours). Usable as a context manager."""

    def __init__(
        self,
        workdir: str | epath.Path,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        settle_s: float = SETTLE_S,
    ):
        self.workdir = storage.absolute(storage.to_path(workdir))
        self.path = self.workdir / LOCK
        self.local = storage.is_local(self.workdir)
        self.heartbeat_s = heartbeat_s
        self.settle_s = settle_s
        self.held = False
        self.lost: str | None = None  # object stores: why the heartbeat found the lock not ours
        self._token = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _me(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "token": f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}",
        }

    def _create(self, path: epath.Path, content: dict[str, Any]) -> bool:
        if not self.local:
            return self._create_advisory(path, content)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _create_advisory(self, path: epath.Path, content: dict[str, Any]) -> bool:
        """An object store's stand-in for O_EXCL: write if absent, then check it stayed ours."""
        if path.exists():
            return False
        path.write_text(json.dumps(content))
        time.sleep(self.settle_s)
        try:
            return json.loads(path.read_text()).get("token") == content["token"]
        except (FileNotFoundError, ValueError, AttributeError):
            return False

    def _read(self) -> dict[str, Any] | None:
        """The holder's record; None if the lock vanished; {} if unreadable (being written, or
        damaged: judged by its age alone)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _fs_now(self) -> float:
        """The file system's clock now: the mtime of a file just written (hosts' clocks differ)."""
        probe = self.workdir / f".lmflax.lock.clock-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("")
        try:
            return storage.mtime(probe)
        finally:
            probe.unlink()

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the lock's holder is gone, or None while it may still be running."""
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _alive(holder["pid"], holder.get("proc_start")):
                return f"its process {holder['pid']} on this host is gone"
            return None
        try:
            age = self._fs_now() - storage.mtime(self.path)
        except FileNotFoundError:
            return "it was just released"
        if age > STALE_AFTER_S:
            return f"it was last refreshed {age:.0f} s ago (over {STALE_AFTER_S:.0f} s)"
        return None

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one with a warning; else WorkdirLockedError."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(100):
            me = self._me()
            if self._create(self.path, me):
                self._token, self.held = me["token"], True
                self._start_heartbeat()
                return
            holder = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            if not holder and attempt < 40:
                time.sleep(0.025)  # created a moment ago and not written yet: read it again
                continue
            reason = self._stale_reason(holder)
            if reason is None:
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by another run ({_holder_text(holder)}; "
                    f"lock file {self.path}). One run writes a workdir at a time: wait for it to "
                    "finish, stop it, or use another --workdir. If that run is gone and this "
                    f"lock remains, delete {self.path}"
                )
            self._take_over(holder, reason)
        raise WorkdirLockedError(f"could not take the lock {self.path}: it keeps changing hands")

    def _take_over(self, holder: dict[str, Any], reason: str) -> None:
        """Removes a stale lock, if it is still the same one, holding the takeover marker."""
        marker = self.path.with_name(LOCK + ".takeover")
        if not self._create(marker, self._me()):
            try:
                if self._fs_now() - storage.mtime(marker) > _TAKEOVER_STALE_S:
                    marker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        try:
            if self._read() == holder:
                self.path.unlink(missing_ok=True)
                log.warning(
                    "took over the stale lock of workdir %s (%s): %s",
                    self.workdir,
                    _holder_text(holder),
                    reason,
                )
        finally:
            marker.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        record = self.path.read_text() if not self.local else ""

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                with contextlib.suppress(OSError):
                    if self.local:
                        os.utime(self.path)
                        continue
                    holder = self._read()
                    if holder and holder.get("token") != self._token:
                        self.lost = f"the lock was taken by another run ({_holder_text(holder)})"
                        log.error("workdir %s: %s", self.workdir, self.lost)
                        return
                    self.path.write_text(record)  # rewriting an object moves its mtime

        self._thread = threading.Thread(target=beat, name="lmflax-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Removes the lock if this process still holds it."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder and holder.get("token") == self._token:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
