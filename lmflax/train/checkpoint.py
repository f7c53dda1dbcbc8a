"""Checkpoints with orbax: the train state's arrays, the data iterator's position, and metadata.

Saves are asynchronous (training continues while arrays are written); orbax writes each step to
a temporary directory and renames it when complete, so an interrupted save never looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from lmflax.data.pipeline import state_from_json

log = logging.getLogger(__name__)


class Checkpointer:
    """Owns an orbax CheckpointManager under `directory` (workdir/checkpoints).

    Each checkpoint holds items 'state' ({step, params, opt_state}), 'data' (one JSON file of
    grain iterator state per process) and 'meta' (a small JSON dict).
    """

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
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

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

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

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class _DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's handler, restoring through `state_from_json` (see there for the grain bug)."""

    def restore(self, directory: Any, item: Any = None, args: Any = None) -> Any:
        item = item or args.item
        path = Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            saved = sorted(p.name for p in Path(directory).glob("process_*.json"))
            raise ValueError(
                f"no data-iterator state {path.name} in {directory} (it holds {saved}): the "
                "checkpoint was written by a different number of processes"
            )
        item.set_state(state_from_json(json.loads(path.read_text())))
        return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    item: Any


class _IteratorSnapshot:
    """The iterator's position now. An asynchronous save may run grain's handler later, after the
    loop has drawn more batches; handing it this frozen state keeps the saved position exact."""

    def __init__(self, iterator: Any):
        # grain's handler writes `get_state().decode()` for objects that are not its own iterators.
        self._state = json.dumps(iterator.get_state(), indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what orbax restores into)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
