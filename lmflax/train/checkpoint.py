"""Checkpoints with orbax: the train state's arrays, the data iterator's position, and metadata.

Saves are asynchronous (training continues while arrays are written); orbax writes each step to
a temporary directory and renames it when complete, so an interrupted save never looks finished.
Once a step is finished, its files' SHA-256 sums are recorded in `lmflax_checksums.json` inside
it; `restore_latest` verifies them and falls back to an older checkpoint (moving the damaged one
aside, never deleting it) rather than loading different values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from lmflax.data.pipeline import state_from_json

log = logging.getLogger(__name__)

CHECKSUMS = "lmflax_checksums.json"


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint whose files no longer match the sums recorded when it was written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def record_checksums(step_dir: Path) -> None:
    """Writes {relative path: [size, sha256]} for every file of a finished checkpoint."""
    sums = {str(p.relative_to(step_dir)): [p.stat().st_size, _sha256(p)] for p in _files(step_dir)}
    tmp = step_dir / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps(sums, indent=1, sort_keys=True))
    tmp.replace(step_dir / CHECKSUMS)


def verify_checksums(step_dir: Path) -> bool:
    """True if every recorded file is present with its size and SHA-256; False if no sums were
    recorded (the process stopped between finishing the save and recording them). Raises
    CheckpointIntegrityError naming the first file that differs."""
    path = step_dir / CHECKSUMS
    if not path.exists():
        return False
    sums = json.loads(path.read_text())
    for rel, (size, digest) in sorted(sums.items()):
        f = step_dir / rel
        if not f.is_file():
            raise CheckpointIntegrityError(f"{f} is missing")
        if f.stat().st_size != size:
            raise CheckpointIntegrityError(f"{f} is {f.stat().st_size} bytes, {size} when saved")
        if _sha256(f) != digest:
            raise CheckpointIntegrityError(f"{f} does not match its SHA-256 recorded when saved")
    return True


class Checkpointer:
    """Owns an orbax CheckpointManager under `directory` (workdir/checkpoints).

    Each checkpoint holds items 'state' ({step, params, opt_state}), 'data' (one JSON file of
    grain iterator state per data shard, see `lmflax.data.shards`) and 'meta' (a small JSON dict).
    Every process of a multi-host run calls save/restore: orbax writes each array's shards from
    the processes that hold them and restores into whatever shardings the target asks for.
    Retention: the newest `keep` survive, plus every step divisible by `keep_every` (0 = none).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int,
        keep_every: int = 0,
        verify: bool = True,
        async_save: bool = True,
    ):
        self.directory = Path(directory).absolute()
        self.verify = verify
        self._lock = threading.Lock()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._record_finished)
            if async_save
            else None,
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

    def _record_finished(self) -> None:
        """Called by orbax after each save is finalized: sums for finished steps lacking them."""
        if jax.process_index() != 0:
            return
        with self._lock:
            # Finished steps are the directories named by a bare number: orbax writes into a
            # temporary name and renames on success.
            for step_dir in self.directory.iterdir():
                if (
                    step_dir.name.isdigit()
                    and step_dir.is_dir()
                    and not (step_dir / CHECKSUMS).exists()
                ):
                    record_checksums(step_dir)

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

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
        args = {"state": ocp.args.StandardSave(state_arrays), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data"] = _DataSave(_IteratorSnapshot(data_iter))
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict[str, Any]]:
        """Restores arrays into the shardings of `abstract_state` (ShapeDtypeStructs with
        .sharding) and, if given, the data iterator's position in place. Returns (arrays, meta)."""
        args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            args["data"] = _DataRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], restored["meta"]

    def restore_latest(
        self, abstract_state: Any, data_iter: Any
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest checkpoint that verifies: (step, arrays, meta), or None if there
        is no checkpoint. A damaged one is moved aside to `<step>.corrupt-<time>` and the next
        older one is tried, with a warning naming the file. Raises CheckpointIntegrityError when
        checkpoints exist but none verifies."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.directory / str(step)
            if self.verify:
                try:
                    if not verify_checksums(step_dir):
                        log.warning(
                            "checkpoint %s has no recorded checksums (the run stopped right after "
                            "saving it); restoring it unverified",
                            step_dir,
                        )
                except CheckpointIntegrityError as e:
                    aside = step_dir.with_name(f"{step}.corrupt-{int(time.time())}")
                    if jax.process_index() == 0:
                        step_dir.rename(aside)
                    log.error("checkpoint step %d is damaged (%s); moved to %s", step, e, aside)
                    damaged.append(f"step {step}: {e}")
                    self.manager.reload()
                    continue
            arrays, meta = self.restore(step, abstract_state, data_iter)
            if damaged:
                log.warning("fell back to checkpoint step %d", step)
            return step, arrays, meta
        if damaged:
            raise CheckpointIntegrityError(
                "no checkpoint verifies: " + "; ".join(damaged) + ". Damaged checkpoints were "
                "moved aside, not deleted; set train.verify_checkpoints=false to load one anyway"
            )
        return None

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished (raising its error if it failed)."""
        self.manager.wait_until_finished()
        self._record_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


class DataStateError(ValueError):
    """A checkpoint's data-iterator state does not fit the data stream of this run."""


def _shard_file(directory: Path, shard: int, num_shards: int) -> Path | None:
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
