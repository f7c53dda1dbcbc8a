"""Checkpoint tensors that are read piecewise: a view of a tensor in a safetensors file that the
converters' transforms can transpose, reshape, slice, scale and stack without reading it, and
that reads only the bytes a requested block of it needs.

    t = source.lazy("model.layers.0.self_attn.q_proj.weight")   # [N·H, D] in the file
    k = t.T.reshape(D, N, H)                                    # nothing read yet
    block = k.read((slice(0, D // 8), slice(None), slice(None)))  # reads D/8 of each row

A `View` is numpy's strided-view model over the tensor's bytes: an element offset, a shape
and element strides. Transposes, basic slicing, integer indexing (iterating over axis 0) and
the reshapes numpy can do without copying (splitting an axis, merging axes that are adjacent
in memory) give another View. `read(index)` walks the block in memory order, reads each
contiguous run with one `pread` (adjacent runs together) and counts the bytes in
`read_counter` (also `lmflax.hf.files.read_counter`).

Fallback, per tensor: an operation with no strided form (a reshape that would need a copy, an
unknown numpy function applied to a lazy tensor) reads that one tensor whole on this host and
continues with an in-memory array (`read_counter.whole` counts these); it never reads more
than the one tensor. Elementwise maps (`t * scale`, `astype`) commute with the view
operations and are applied to each block as it is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmflax.data.hub import CheckpointError

Index = tuple[slice, ...]


class ReadCounter:
    """What this process has read of tensor data (the header and index files not counted):
    `bytes`, `reads` (separate file reads of lazy blocks), `largest` (the most bytes one
    tensor read or one lazy block read brought in), `whole` (lazy tensors that fell back to
    being read whole). Tests assert on it; `reset()` zeroes it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes = 0
        self.reads = 0
        self.largest = 0
        self.whole = 0

    def __repr__(self) -> str:
        return (
            f"ReadCounter(bytes={self.bytes}, reads={self.reads}, largest={self.largest}, "
            f"whole={self.whole})"
        )

    def add(self, nbytes: int, reads: int = 1) -> None:
        self.bytes += nbytes
        self.reads += reads
        self.largest = max(self.largest, nbytes)


read_counter = ReadCounter()


def _full(shape: Sequence[int]) -> Index:
    return tuple(slice(None) for _ in shape)


class Lazy:
    """A tensor not yet read: `shape`, `dtype`, and `read(index) -> np.ndarray` of the block
    `index` (a tuple of slices, as `jax.make_array_from_callback` passes them)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, index: Index | None = None) -> np.ndarray:
        raise NotImplementedError

    # numpy-like surface used by the converters' transforms ---------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(self.shape[0]))

    @property
    def T(self) -> Any:
        return self.transpose()

    def transpose(self, *axes: Any) -> Any:
        return np.asarray(self).transpose(*axes)

    def reshape(self, *shape: Any) -> Any:
        return np.asarray(self).reshape(*shape)

    def __getitem__(self, index: Any) -> Any:
        return np.asarray(self)[index]

    def astype(self, dtype: Any) -> Any:
        return Map(self, lambda x: x.astype(dtype))

    def __mul__(self, other: Any) -> Any:
        if np.ndim(other) == 0:
            return Map(self, lambda x: x * other)
        return np.asarray(self) * other

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Any:
        if np.ndim(other) == 0:
            return Map(self, lambda x: x / other)
        return np.asarray(self) / other

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # The per-tensor fallback: this one tensor, whole, on this host.
        read_counter.whole += 1
        out = self.read(_full(self.shape))
        return out if dtype is None else out.astype(dtype)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.moveaxis:
            return _moveaxis(*args, **kwargs)
        if func is np.transpose:
            a, *rest = args
            return a.transpose(*rest, *kwargs.values())
        if func is np.reshape:
            a, *rest = args
            return a.reshape(*rest, *kwargs.values())
        if func is np.shape:
            return args[0].shape
        if func is np.ndim:
            return args[0].ndim

        # Anything else: the lazy arguments read whole (the documented fallback).
        def real(x: Any) -> Any:
            if isinstance(x, Lazy):
                return np.asarray(x)
            if isinstance(x, list | tuple):
                return type(x)(real(v) for v in x)
            return x

        return func(*real(args), **{k: real(v) for k, v in kwargs.items()})


def _moveaxis(a: Any, source: Any, destination: Any) -> Any:
    if not isinstance(a, Lazy):
        return np.moveaxis(a, source, destination)
    src = [s % a.ndim for s in np.atleast_1d(source)]
    dst = [d % a.ndim for d in np.atleast_1d(destination)]
    order = [n for n in range(a.ndim) if n not in src]
    for d, s in sorted(zip(dst, src)):
        order.insert(d, s)
    return a.transpose(*order)


class Blob:
    """Where a tensor's bytes are: a file, the byte offset of element 0, its dtype and shape
    (C order; checked against the file by the reader that made it)."""

    def __init__(self, path: Path, start: int, dtype: np.dtype, shape: tuple[int, ...], name: str):
        self.path, self.start, self.dtype, self.shape, self.name = path, start, dtype, shape, name


def _c_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class View(Lazy):
    """A strided view (element `offset`, `shape`, element `strides`) of a tensor in a file."""

    def __init__(
        self,
        blob: Blob,
        offset: int = 0,
        shape: tuple[int, ...] | None = None,
        strides: tuple[int, ...] | None = None,
    ):
        self.blob = blob
        self.dtype = blob.dtype
        self.offset = offset
        self.shape = tuple(blob.shape if shape is None else shape)
        self.strides = tuple(_c_strides(self.shape) if strides is None else strides)

    def __repr__(self) -> str:
        return f"View({self.blob.name!r}, shape={self.shape}, strides={self.strides})"

    def transpose(self, *axes: Any) -> View:
        if len(axes) == 1 and isinstance(axes[0], tuple | list):
            axes = tuple(axes[0])
        axes = tuple(reversed(range(self.ndim))) if not axes else tuple(a % self.ndim for a in axes)
        if sorted(axes) != list(range(self.ndim)):
            raise ValueError(f"axes {axes} are not a permutation of {self.ndim} dimensions")
        return View(
            self.blob,
            self.offset,
            tuple(self.shape[a] for a in axes),
            tuple(self.strides[a] for a in axes),
        )

    def reshape(self, *shape: Any) -> Any:
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        shape = tuple(int(n) for n in shape)
        if -1 in shape:
            known = math.prod(n for n in shape if n != -1)
            shape = tuple(self.size // known if n == -1 else n for n in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape a tensor of shape {self.shape} into {shape}")
        strides = _nocopy_strides(self.shape, self.strides, shape)
        if strides is None:
            return np.asarray(self).reshape(shape)  # the per-tensor fallback
        return View(self.blob, self.offset, shape, strides)

    def __getitem__(self, index: Any) -> Any:
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            fill = (slice(None),) * (self.ndim - len(index) + 1)
            index = index[:at] + fill + index[at + 1 :]
        if len(index) > self.ndim or not all(
            isinstance(i, slice | int | np.integer) for i in index
        ):
            return np.asarray(self)[index]  # advanced indexing: the fallback
        index = index + (slice(None),) * (self.ndim - len(index))
        offset, shape, strides = self.offset, [], []
        for i, n, st in zip(index, self.shape, self.strides):
            if isinstance(i, slice):
                start, stop, step = i.indices(n)
                if step < 0:
                    return np.asarray(self)[index]
                count = max(0, (stop - start + step - 1) // step)
                offset += start * st if count else 0
                shape.append(count)
                strides.append(st * step)
            else:
                i = int(i)
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of bounds for axis of size {n}")
                offset += (i % n) * st
        return View(self.blob, offset, tuple(shape), tuple(strides))

    def read(self, index: Index | None = None) -> np.ndarray:
        view = self if index is None else self[tuple(index)]
        if not isinstance(view, View):
            return np.asarray(view)
        return _read_strided(view.blob, view.offset, view.shape, view.strides)


def _nocopy_strides(
    old: tuple[int, ...], strides: tuple[int, ...], new: tuple[int, ...]
) -> tuple[int, ...] | None:
    """The strides of `new` viewing the same elements as (`old`, `strides`) in C order without a
    copy, or None when there are none (numpy's `_attempt_nocopy_reshape`, in elements)."""
    if math.prod(new) == 0:
        return _c_strides(new)
    dims = [(n, s) for n, s in zip(old, strides) if n != 1]
    out = [0] * len(new)
    oi, oj, ni, nj = 0, 1, 0, 1
    # Walk groups of old and new axes whose sizes multiply to the same number.
    while ni < len(new) and oi < len(dims):
        n_prod, o_prod = new[ni], dims[oi][0]
        while n_prod != o_prod:
            if n_prod < o_prod:
                n_prod *= new[nj]
                nj += 1
            else:
                o_prod *= dims[oj][0]
                oj += 1
        # The group's old axes must follow each other in memory to be merged.
        for k in range(oi, oj - 1):
            if dims[k][1] != dims[k + 1][0] * dims[k + 1][1]:
                return None
        out[nj - 1] = dims[oj - 1][1]
        for k in range(nj - 1, ni, -1):
            out[k - 1] = out[k] * new[k]
        ni, nj = nj, nj + 1
        oi, oj = oj, oj + 1
    last = out[ni - 1] if ni >= 1 else 1
    for k in range(ni, len(new)):
        out[k] = last
    return tuple(out)


# Above this many separate runs in one block, read the span covering the block instead (one
# read of at most the tensor; avoids millions of tiny reads for views that step over elements).
_MAX_RUNS = 1 << 20


def _read_strided(
    blob: Blob, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]
) -> np.ndarray:
    """The elements of the view (`offset`, `shape`, `strides`) of `blob`, reading only the
    contiguous runs of bytes they occupy in the file."""
    dtype = blob.dtype
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    dims = [d for d in range(len(shape)) if shape[d] > 1]
    # Memory order: the largest stride outermost (transposed views have strides in any order).
    order = sorted(dims, key=lambda d: -strides[d])
    sizes = [shape[d] for d in order]
    steps = [strides[d] for d in order]
    if any(s == 0 for s in steps):  # a broadcast view (never made here): its span
        return _via_span(blob, offset, shape, strides)
    run, k = 1, len(order)
    while k > 0 and steps[k - 1] == run:
        run *= sizes[k - 1]
        k -= 1
    n_runs = math.prod(sizes[:k])
    if n_runs > _MAX_RUNS and n_runs > 1:
        return _via_span(blob, offset, shape, strides)
    starts = np.array([offset], np.int64)
    for n, s in zip(sizes[:k], steps[:k]):
        starts = (starts[:, None] + np.arange(n, dtype=np.int64) * s).reshape(-1)
    out = np.empty(n_runs * run, dtype)
    # Runs that follow each other in the file are read together.
    breaks = np.flatnonzero(starts[1:] != starts[:-1] + run) + 1
    first = np.concatenate([[0], breaks])
    last = np.concatenate([breaks, [len(starts)]])
    item = dtype.itemsize
    buf = memoryview(out.view(np.uint8))
    with open(blob.path, "rb") as f:
        fd = f.fileno()
        for a, b in zip(first.tolist(), last.tolist()):
            _pread_into(
                fd, buf[a * run * item : b * run * item], blob.start + int(starts[a]) * item, blob
            )
    read_counter.add(out.nbytes, len(first))
    # `out` holds the block's elements in memory order (`order`); back to the view's order.
    arranged = out.reshape(sizes).transpose(np.argsort(order)) if order else out
    return arranged.reshape(shape)


def _via_span(
    blob: Blob, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]
) -> np.ndarray:
    """Reads the bytes from the view's first to its last element once, then views them."""
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    item = blob.dtype.itemsize
    span = np.empty(last - offset + 1, blob.dtype)
    with open(blob.path, "rb") as f:
        _pread_into(f.fileno(), memoryview(span.view(np.uint8)), blob.start + offset * item, blob)
    read_counter.add(span.nbytes)
    return np.lib.stride_tricks.as_strided(
        span, shape, tuple(s * item for s in strides), writeable=False
    ).copy()


def _pread_into(fd: int, buf: memoryview, at: int, blob: Blob) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], at + done)
        if got <= 0:
            raise CheckpointError(
                f"{blob.path}: tensor {blob.name!r}: the file ends at byte {at + done}, inside "
                "the tensor's data (the file changed or is truncated)"
            )
        done += got


class Map(Lazy):
    """`fn` (elementwise: a scale, a dtype cast) applied to each block of `base` as it is read."""

    def __init__(self, base: Lazy, fn: Callable[[np.ndarray], np.ndarray]):
        self.base, self.fn = base, fn
        self.shape = base.shape
        self.dtype = np.asarray(fn(np.zeros((0,), base.dtype))).dtype

    def _wrap(self, x: Any) -> Any:
        return Map(x, self.fn) if isinstance(x, Lazy) else self.fn(x)

    def transpose(self, *axes: Any) -> Any:
        return self._wrap(self.base.transpose(*axes))

    def reshape(self, *shape: Any) -> Any:
        return self._wrap(self.base.reshape(*shape))

    def __getitem__(self, index: Any) -> Any:
        return self._wrap(self.base[index])

    def read(self, index: Index | None = None) -> np.ndarray:
        return np.asarray(self.fn(self.base.read(index)))


class Stack(Lazy):
    """`np.stack(parts)` along a new axis 0 (the scanned-layers layout), read part by part."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        shapes = {tuple(np.shape(p)) for p in self.parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack tensors of shapes {sorted(shapes)}")
        self.shape = (len(self.parts), *shapes.pop())
        self.dtype = np.result_type(*(p.dtype for p in self.parts))

    def read(self, index: Index | None = None) -> np.ndarray:
        index = _full(self.shape) if index is None else tuple(index)
        first, rest = index[0], index[1:]
        picks = range(len(self.parts))[first] if isinstance(first, slice) else [int(first)]
        blocks = [_read_any(self.parts[i], rest) for i in picks]
        out = np.stack(blocks).astype(self.dtype, copy=False) if blocks else None
        if out is None:
            return np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *rest)]
        return out if isinstance(first, slice) else out[0]


def _read_any(x: Any, index: Index) -> np.ndarray:
    if isinstance(x, Lazy):
        return x.read(index)
    return np.asarray(x)[index]


def stack(parts: Sequence[Any]) -> Any:
    """np.stack of `parts` along axis 0, lazily when any part is lazy."""
    if any(isinstance(p, Lazy) for p in parts):
        return Stack(parts)
    return np.stack([np.asarray(p) for p in parts])


def read_block(x: Any, index: Index) -> np.ndarray:
    """The block `index` of `x`, lazy or an array."""
    return _read_any(x, tuple(index))


def array_equal(a: Any, b: Any, block_bytes: int = 1 << 26) -> bool:
    """np.array_equal for lazy tensors, compared in blocks of rows (neither is read whole)."""
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        return False
    shape = tuple(np.shape(a))
    if not shape:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    row = max(1, math.prod(shape[1:]) * np.dtype(a.dtype).itemsize)
    step = max(1, block_bytes // row)
    for i in range(0, shape[0], step):
        index = (slice(i, min(i + step, shape[0])), *_full(shape[1:]))
        if not np.array_equal(_read_any(a, index), _read_any(b, index)):
            return False
    return True
