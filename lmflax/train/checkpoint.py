"""Checkpoints with orbax: the train state's arrays, the data iterator's position, and metadata.

Saves are asynchronous (training continues while arrays are written); orbax writes each step to
a temporary directory and renames it when complete, so an interrupted save never looks finished.
The SHA-256 sums of a step's files are written into it (`lmflax_checksums.json`) in orbax's
commit step, after every file is written and before the rename: a checkpoint counts as finished
only with its checksums. `restore_latest` verifies them and falls back to an older checkpoint
(moving the damaged one aside, never deleting it) rather than loading different values; with
`verify=False` it loads the newest one, moved-aside ones included, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
import traceback
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lmflax import storage
from lmflax.data.pipeline import state_from_json

Path = epath.Path  # every path here may be a URL (gs://): epath, never pathlib

log = logging.getLogger(__name__)

CHECKSUMS = "lmflax_checksums.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax names a step's directory this until it is finished


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint whose files no longer match the sums recorded when it was written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: Path, prefix: str = "") -> list[tuple[str, Path]]:
    """(path relative to step_dir, with '/', and the path) of every file but the checksums,
    sorted; listed with epath (iterdir), which works the same on local disks and buckets."""
    found = []
    for item in step_dir.iterdir():
        rel = prefix + item.name
        if item.is_dir():
            found.extend(_files(item, rel + "/"))
        elif rel != CHECKSUMS:
            found.append((rel, item))
    return sorted(found)


# orbax's step metadata: orbax adds its commit time to it in the rename step, after the sums are
# written, so its sum covers its JSON without that one field.
_STEP_METADATA = "_CHECKPOINT_METADATA"
_COMMIT_TIME = "commit_timestamp_nsecs"


def _fingerprint(path: Path) -> tuple[int, str]:
    """(size, SHA-256) of a file; (-1, SHA-256 of canonical JSON without the commit time) for
    orbax's step metadata (-1 if that file is not valid JSON: it then differs from any record)."""
    if path.name != _STEP_METADATA:
        return storage.file_size(path), _sha256(path)
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return -1, "not valid JSON"
    if isinstance(meta, dict):
        meta.pop(_COMMIT_TIME, None)
    return -1, hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def record_checksums(step_dir: str | os.PathLike) -> None:
    """Writes {relative path: [size, sha256]} for every file of a checkpoint being committed.
    Runs on one process (process 0, in orbax's commit step): the files are shared storage."""
    step_dir = storage.to_path(step_dir)
    sums = {rel: list(_fingerprint(p)) for rel, p in _files(step_dir)}
    storage.replace_atomically(step_dir / CHECKSUMS, json.dumps(sums, indent=1, sort_keys=True))


def _read_checksums(step_dir: Path) -> dict[str, tuple[int, str]]:
    """The recorded {relative path: (size, sha256)}; CheckpointIntegrityError if the file is
    missing or is not what `record_checksums` writes (damaged like any other file)."""
    path = step_dir / CHECKSUMS
    if not path.is_file():
        raise CheckpointIntegrityError(
            f"{path} is missing (every finished checkpoint has one, written before the "
            "checkpoint is renamed to its final name)"
        )
    try:
        sums = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointIntegrityError(f"{path} is not valid JSON ({e})") from None
    out: dict[str, tuple[int, str]] = {}
    if not isinstance(sums, dict):
        raise CheckpointIntegrityError(f"{path} holds a {type(sums).__name__}, not a JSON object")
    for rel, entry in sums.items():
        ok = (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], int)
            and isinstance(entry[1], str)
            and storage.is_inside(step_dir, rel)
        )
        if not ok:
            raise CheckpointIntegrityError(
                f"{path} has a malformed entry {rel!r}: {entry!r} (expected [size, sha256] for a "
                "file inside the checkpoint)"
            )
        out[rel] = (entry[0], entry[1])
    if not out:
        raise CheckpointIntegrityError(f"{path} records no files")
    return out


def verify_checksums(step_dir: str | os.PathLike) -> bool:
    """True if every recorded file is present with its size and SHA-256. Raises
    CheckpointIntegrityError naming the first file that differs, or the checksum file itself when
    it is missing or damaged."""
    step_dir = storage.to_path(step_dir)
    for rel, (size, digest) in sorted(_read_checksums(step_dir).items()):
        f = step_dir / rel
        if not f.is_file():
            raise CheckpointIntegrityError(f"{f} is missing")
        if size >= 0 and storage.file_size(f) != size:
            raise CheckpointIntegrityError(
                f"{f} is {storage.file_size(f)} bytes, {size} when saved"
            )
        if _fingerprint(f)[1] != digest:
            raise CheckpointIntegrityError(f"{f} does not match its SHA-256 recorded when saved")
    return True


def verify_on_one_process(step_dir: str | os.PathLike) -> None:
    """`verify_checksums` on process 0 only (the files are on storage every host shares, so
    hashing them on every host would read the checkpoint once per host); every process gets
    its verdict and raises the same CheckpointIntegrityError (the others say to look at
    process 0's log for the file)."""
    step_dir = storage.to_path(step_dir)
    error = None
    if jax.process_index() == 0:
        try:
            verify_checksums(step_dir)
        except CheckpointIntegrityError as e:
            error = str(e)
    if jax.process_count() > 1:
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = f"{step_dir} failed verification on process 0 (its log names the file)"
    if error is not None:
        raise CheckpointIntegrityError(error)


def _raised_in_orbax(exc_info: Any) -> bool:
    """Whether the traceback of a log record's exception passes through orbax's code."""
    if not exc_info or not isinstance(exc_info, tuple) or exc_info[2] is None:
        return False
    marker = f"{os.sep}orbax{os.sep}"
    return any(marker in frame.filename for frame in traceback.extract_tb(exc_info[2]))


class _QuietOrbaxFailures(logging.Filter):
    """A failed background save (a full disk) makes orbax log the same error with its traceback
    from several threads, hundreds of lines in all, and asyncio then logs each of orbax's write
    futures nobody awaited ("_GatheringFuture exception was never retrieved") with the same
    traceback; lmflax reports the failure once, with what is still intact, when it surfaces
    (`check_errors`, `wait`). Those records go to lmflax's DEBUG log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and (
            f"{os.sep}orbax{os.sep}" in record.pathname or _raised_in_orbax(record.exc_info)
        ):
            log.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
            return False
        return True


def _is_closed_loop(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _quiet_orbax_failures() -> None:
    """Keeps orbax's own reports of a failed background save out of the log: its ERROR records
    and asyncio's about its unawaited write futures (see `_QuietOrbaxFailures`), and the 'Event loop is closed' tracebacks that tensorstore's
    threads print (through sys.excepthook or sys.unraisablehook) when a write completes after
    orbax has given up on the save."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietOrbaxFailures) for f in logger.filters):
            logger.addFilter(_QuietOrbaxFailures())
    if not getattr(sys.excepthook, "lmflax_quiet", False):
        previous_except = sys.excepthook

        def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
            if _is_closed_loop(value):
                log.debug("a write finished after its save had failed: %s", value)
                return
            previous_except(kind, value, tb)

        excepthook.lmflax_quiet = True  # type: ignore[attr-defined]
        sys.excepthook = excepthook
    if not getattr(sys.unraisablehook, "lmflax_quiet", False):
        previous_unraisable = sys.unraisablehook

        def unraisablehook(unraisable: Any) -> None:
            if _is_closed_loop(unraisable.exc_value):
                log.debug("a write finished after its save had failed: %s", unraisable.exc_value)
                return
            previous_unraisable(unraisable)

        unraisablehook.lmflax_quiet = True  # type: ignore[attr-defined]
        sys.unraisablehook = unraisablehook


class Checkpointer:
    """Owns an orbax CheckpointManager under `directory` (workdir/checkpoints).

    Each checkpoint holds items 'state' ({step, params, opt_state}), 'data' (one JSON file of
    grain iterator state per data shard, see `lmflax.data.shards`) and 'meta' (a small JSON dict).
    Every process of a multi-host run calls save/restore: orbax writes each array's shards from
    the processes that hold them and restores into whatever shardings the target asks for.
    Retention: the newest `keep` survive, plus every step divisible by `keep_every` (0 = none).
    read_only: for inspecting a run (possibly while it trains): never saves, deletes, or cleans
    up the unfinished directory of a save in progress.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int,
        keep_every: int = 0,
        verify: bool = True,
        read_only: bool = False,
    ):
        self.directory = storage.absolute(storage.to_path(directory))
        self.verify = verify
        self.read_only = read_only
        self._saving: int | None = None  # the step whose save is in flight
        _quiet_orbax_failures()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            keep_period=None if read_only else keep_every or None,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=not read_only,
            # Runs in orbax's commit step, after every item is written and before the rename
            # that makes the checkpoint visible (orbax's async_checkpointer), on process 0.
            async_options=ocp.AsyncOptions(post_finalization_callback=self._record_committing),
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": _DataHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def _record_committing(self) -> None:
        """Writes the checksums of the step being committed into its temporary directory, so the
        rename that finishes it also publishes its sums (there is no finished checkpoint without
        them; a kill before the rename leaves an unfinished directory, which is never restored)."""
        if jax.process_index() != 0 or self._saving is None:
            return
        step = self._saving
        tmp = self.directory / f"{step}{TMP_SUFFIX}"
        # Without a temporary directory (atomicity by commit file, e.g. on GCS) the step is
        # written in place and becomes finished when orbax writes its commit file, after this.
        record_checksums(tmp if tmp.is_dir() else self.directory / str(step))

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def finished_steps(self) -> list[int]:
        """The finished checkpoints on disk now (final name and checksums), read from the
        directory itself rather than orbax's bookkeeping, which a failed save can leave stale."""
        if not self.directory.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in self.directory.iterdir()
            if p.name.isdigit() and (p / CHECKSUMS).is_file()
        )

    def set_aside(self) -> list[tuple[int, Path]]:
        """Checkpoints moved aside as damaged (`<step>.corrupt-<time>`), newest step first."""
        found = []
        for p in self.directory.glob("*.corrupt-*") if self.directory.is_dir() else []:
            step, _, _ = p.name.partition(".corrupt-")
            if step.isdigit() and p.is_dir():
                found.append((int(step), p))
        return sorted(found, key=lambda x: (x[0], x[1].name), reverse=True)

    def check_errors(self) -> None:
        """Raises the error of an asynchronous save that failed since the last check."""
        self.manager.check_for_errors()

    def data_shards(self, step: int) -> int | None:
        """How many data shards the checkpoint at `step` holds positions for (None: no data)."""
        return data_shard_count(self.directory / str(step) / "data")

    def save(
        self,
        step: int,
        state_arrays: Any,
        data_iter: Any,
        meta: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Starts saving (returns once arrays are copied off the accelerator). Returns whether a
        save was started."""
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only; it cannot save")
        args = {"state": ocp.args.StandardSave(state_arrays), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data"] = _DataSave(_IteratorSnapshot(data_iter))
        # orbax waits for the previous save to finish before starting this one, so one step is
        # in flight at a time: the commit callback records this step's sums.
        self.manager.wait_until_finished()
        self._saving = step
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict[str, Any]]:
        """Restores arrays into the shardings of `abstract_state` (ShapeDtypeStructs with
        .sharding) and, if given, the data iterator's position in place. Returns (arrays, meta)."""
        args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            args["data"] = _DataRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], restored["meta"]

    def _move_aside(self, step: int) -> Path:
        step_dir = self.directory / str(step)
        aside = step_dir.with_name(f"{step}.corrupt-{int(time.time())}")
        n = 1
        while aside.exists():
            aside = step_dir.with_name(f"{step}.corrupt-{int(time.time())}-{n}")
            n += 1
        if jax.process_index() == 0:
            step_dir.rename(aside)
        return aside

    def _unverified_candidate(self) -> int | None:
        """verify=False: the newest checkpoint, finished or moved aside, put back under its step
        name (so orbax can read it) when it was moved aside. Loud: it may hold damaged values."""
        finished = self.all_steps()
        aside = self.set_aside()
        newest = max(finished, default=None)
        if aside and (newest is None or aside[0][0] > newest):
            step, path = aside[0]
            if jax.process_index() == 0:
                path.rename(self.directory / str(step))
            self.manager.reload()
            log.warning(
                "train.verify_checkpoints=false: restoring checkpoint step %d UNVERIFIED from %s "
                "(it failed verification earlier and was moved aside; now moved back to %s)",
                step,
                path,
                self.directory / str(step),
            )
            return step
        if newest is not None:
            log.warning(
                "train.verify_checkpoints=false: restoring checkpoint step %d of %s UNVERIFIED "
                "(its checksums are not checked)",
                newest,
                self.directory,
            )
        return newest

    def restore_latest(
        self, abstract_state: Any, data_iter: Any
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest checkpoint that verifies: (step, arrays, meta), or None if there
        is no checkpoint. A damaged one (a file, or its checksum file, missing or different) is
        moved aside to `<step>.corrupt-<time>` and the next older one is tried, with a warning
        naming the file. Raises CheckpointIntegrityError when checkpoints exist (moved-aside ones
        included) but none verifies. verify=False: the newest one, moved-aside ones included,
        loaded with a warning."""
        if not self.verify:
            step = self._unverified_candidate()
            if step is None:
                return None
            arrays, meta = self.restore(step, abstract_state, data_iter)
            return step, arrays, meta
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.directory / str(step)
            try:
                verify_on_one_process(step_dir)
            except CheckpointIntegrityError as e:
                aside = self._move_aside(step)
                log.error("checkpoint step %d is damaged (%s); moved to %s", step, e, aside)
                damaged.append(f"step {step}: {e}")
                self.manager.reload()
                continue
            arrays, meta = self.restore(step, abstract_state, data_iter)
            if damaged:
                log.warning("fell back to checkpoint step %d", step)
            return step, arrays, meta
        aside = self.set_aside()
        if damaged or aside:
            raise CheckpointIntegrityError(
                "no checkpoint verifies"
                + (": " + "; ".join(damaged) if damaged else "")
                + ". Damaged checkpoints are kept (moved aside, not deleted): "
                + ", ".join(str(p) for _, p in aside)
                + ". Starting over would discard them, so the run stops. To load the newest "
                "anyway, unverified, rerun the same command with "
                "--config.train.verify_checkpoints=false; to start afresh, use a new --workdir"
            )
        return None

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished (raising its error if it failed)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


class DataStateError(ValueError):
    """A checkpoint's data-iterator state does not fit the data stream of this run."""


def _shard_file(directory: Path, shard: int, num_shards: int) -> Path | None:
    directory = Path(directory)
    for name in (f"shard_{shard}-of-{num_shards}.json", f"process_{shard}-of-{num_shards}.json"):
        # process_I-of-N.json: written by grain's handler before data shards existed; process I
        # of N read exactly what shard I of N reads now.
        if (directory / name).exists():
            return directory / name
    return None


def data_shard_count(directory: Path) -> int | None:
    """The number of data shards whose iterator states a checkpoint's 'data' item holds."""
    counts = {
        int(m.group(1))
        for p in Path(directory).glob("*.json")
        if (m := re.fullmatch(r"(?:shard|process)_\d+-of-(\d+)\.json", p.name))
    }
    if len(counts) > 1:
        raise DataStateError(f"{directory} mixes data states of {sorted(counts)} shards")
    return counts.pop() if counts else None


class _DataHandler(grain.checkpoint.CheckpointHandler):
    """One JSON file of iterator state per data shard (`shard_S-of-N.json`), each written by
    exactly one process (see `lmflax.data.shards`), and read back by every process that reads
    that shard, whatever the process count now."""

    def save(self, directory: Any, item: Any = None, args: Any = None) -> None:
        snapshot = item or args.item
        for shard, text in snapshot.states.items():
            (Path(directory) / f"shard_{shard}-of-{snapshot.num_shards}.json").write_text(text)

    def restore(self, directory: Any, item: Any = None, args: Any = None) -> Any:
        batches = item or args.item
        directory = Path(directory)
        saved = data_shard_count(directory)
        if saved != batches.num_shards:
            raise DataStateError(
                f"{directory} holds the data position of {saved} data shards but this run reads "
                f"{batches.num_shards} (data.num_shards); set data.num_shards={saved} (or 0, "
                "which follows the checkpoint) to resume the same data stream"
            )
        states = {}
        for shard in batches.shards:
            path = _shard_file(directory, shard, saved)
            if path is None:
                raise DataStateError(
                    f"no iterator state for data shard {shard} of {saved} in {directory}; "
                    f"it holds {sorted(p.name for p in directory.glob('*.json'))}"
                )
            # See `state_from_json` for why the JSON lists must become tuples again.
            states[shard] = state_from_json(json.loads(path.read_text()))
        batches.set_state(states)
        return batches


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    item: Any


class _IteratorSnapshot:
    """The shards' positions now, for the shards this process writes. An asynchronous save runs
    the handler later, after the loop has drawn more batches; a frozen copy keeps it exact."""

    def __init__(self, batches: Any):
        states = batches.get_state()
        self.num_shards = batches.num_shards
        self.states = {s: json.dumps(states[s], indent=1) for s in batches.writes}


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what orbax restores into)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
