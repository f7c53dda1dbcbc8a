"""Global batches as a fixed number of data shards, each process reading only its own rows.

A global batch of B rows is the concatenation of S data shards' batches of B/S rows: shard s is
the task's pipeline for documents s, s+S, s+2S, ... (`Task.dataset(process_index=s,
process_count=S)`) and fills global rows [s·B/S, (s+1)·B/S). Which process holds which rows is
decided by the batch sharding over the device mesh; each process reads exactly the shards under
its rows. So the data a step sees depends on S, never on the number of processes or the mesh:
a run on 2 hosts × 2 devices trains on the same batches as one host with 4 devices, and a
checkpoint (one iterator state per shard) resumes exactly on any other process count.

S defaults to the process count of the run that started the stream (`data.num_shards=0`); a
resumed run keeps its checkpoint's S. With fewer shards than processes a shard is read by every
process that holds some of its rows (correct, but the reading is duplicated).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

log = logging.getLogger(__name__)

Interval = tuple[int, int]


def process_rows(sharding: Sharding, global_batch: int) -> list[Interval]:
    """This process's rows of a [global_batch, ...] array with `sharding`, as sorted, merged
    [start, stop) intervals (the order `jax.make_array_from_process_local_data` expects)."""
    return _merge(
        _interval(idx[0], global_batch)
        for idx in sharding.addressable_devices_indices_map((global_batch,)).values()
    )


def shard_writers(sharding: Sharding, global_batch: int, num_shards: int) -> dict[int, int]:
    """For each shard, the lowest process index holding any of its rows: the process that
    writes the shard's iterator state into checkpoints (each state is written exactly once)."""
    rows = global_batch // num_shards
    writers: dict[int, int] = {}
    for device, idx in sharding.devices_indices_map((global_batch,)).items():
        start, stop = _interval(idx[0], global_batch)
        for s in range(start // rows, (stop - 1) // rows + 1):
            writers[s] = min(writers.get(s, device.process_index), device.process_index)
    return writers


def _interval(index: Any, size: int) -> Interval:
    start, stop, step = index.indices(size) if isinstance(index, slice) else (index, index + 1, 1)
    if step != 1:
        raise ValueError(f"batch sharding with a strided row slice {index} is not supported")
    return start, stop


def _merge(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[list[int]] = []
    for start, stop in sorted(set(intervals)):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return [(a, b) for a, b in out]


class ShardedBatches(Iterator[dict[str, np.ndarray]]):
    """Iterator over this process's part of each global batch (a dict of [local_rows, ...]
    arrays, rows in global order), built from the shards under `rows`.

    make_shard(shard, num_shards, shard_batch) -> an iterable of batches of shard_batch rows
    (e.g. `functools.partial(task.dataset, split, seed=...)` adapted). `get_state` /
    `set_state` cover the shards this process reads; `writes` are those whose state it saves.
    """

    def __init__(
        self,
        make_shard: Callable[[int, int, int], Iterable[dict[str, np.ndarray]]],
        *,
        global_batch: int,
        num_shards: int,
        rows: list[Interval],
        writes: Iterable[int] = (),
    ):
        if num_shards <= 0 or global_batch % num_shards:
            raise ValueError(
                f"the global batch ({global_batch}) must split into num_shards={num_shards} "
                "equal data shards"
            )
        self.global_batch = global_batch
        self.num_shards = num_shards
        self.rows_per_shard = global_batch // num_shards
        self.rows = rows
        r = self.rows_per_shard
        # (shard, first row within the shard's batch, stop) for each piece of our rows, in order.
        self._pieces: list[tuple[int, int, int]] = []
        for start, stop in rows:
            for s in range(start // r, (stop - 1) // r + 1):
                lo, hi = max(start, s * r), min(stop, (s + 1) * r)
                self._pieces.append((s, lo - s * r, hi - s * r))
        self.shards = sorted({s for s, _, _ in self._pieces})
        self.writes = sorted(set(writes))
        if not set(self.writes) <= set(self.shards):
            raise ValueError(f"shards to write {self.writes} are not all read ({self.shards})")
        if any(hi - lo < r for _, lo, hi in self._pieces):
            log.warning(
                "data.num_shards=%d does not align with this process's batch rows %s: shards "
                "%s are also read by other processes (set data.num_shards to a multiple of "
                "the process count to read each shard once)",
                num_shards,
                rows,
                self.shards,
            )
        self._iters = {s: iter(make_shard(s, num_shards, r)) for s in self.shards}

    def __next__(self) -> dict[str, np.ndarray]:
        drawn = {s: next(it) for s, it in self._iters.items()}
        keys = drawn[self.shards[0]].keys()
        return {
            k: np.concatenate([np.asarray(drawn[s][k])[lo:hi] for s, lo, hi in self._pieces])
            for k in keys
        }

    def get_state(self) -> dict[int, Any]:
        """{shard: its iterator's state} for every shard this process reads."""
        return {s: self._iters[s].get_state() for s in self.shards}

    def set_state(self, states: dict[int, Any]) -> None:
        """Positions every shard this process reads; `states` must cover all of them."""
        missing = [s for s in self.shards if s not in states]
        if missing:
            raise ValueError(f"no iterator state for data shards {missing}")
        for s in self.shards:
            self._iters[s].set_state(states[s])

    def close(self) -> None:
        for it in self._iters.values():
            close = getattr(it, "close", None)
            if close is not None:
                close()


def for_task(
    task: Any,
    split: str,
    *,
    seed: int,
    sharding: Sharding,
    global_batch: int,
    num_shards: int,
) -> ShardedBatches:
    """The sharded batch stream of a task's `split` for this process (see the module doc)."""
    writers = shard_writers(sharding, global_batch, num_shards)
    me = jax.process_index()

    def make_shard(shard: int, count: int, rows: int) -> Any:
        return task.dataset(
            split, seed=seed, batch_size=rows, process_index=shard, process_count=count
        )

    return ShardedBatches(
        make_shard,
        global_batch=global_batch,
        num_shards=num_shards,
        rows=process_rows(sharding, global_batch),
        writes=[s for s, p in writers.items() if p == me],
    )
