"""Reading and writing the files of a Hugging Face model directory, without PyTorch.

A directory holds `config.json` and its weights as `model.safetensors`, or sharded as
`model.safetensors.index.json` + shards, or PyTorch's `pytorch_model.bin` (+ index). The .bin
files are zip archives holding a pickle whose only objects are tensors; `_TensorUnpickler`
reads exactly that subset and refuses any other object, so a checkpoint cannot run code and
torch is not needed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lmflax.data.hub import CheckpointError, missing_files_hint, model_dir, read_json
from lmflax.hf.lazy import Blob, View, read_counter

_MAX_DIMS = 64  # numpy's limit on the number of dimensions

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def find_weights(path: str | Path) -> Path:
    """The weight file (or shard index) of a model directory, safetensors preferred."""
    path = model_dir(path)
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    present = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"no weights in {path}: looked for {', '.join(WEIGHT_FILES)}; the directory holds "
        f"{', '.join(present) or 'nothing'}" + missing_files_hint(path)
    )


# ---------------------------------------------------------------------------------------------
# Reading


class WeightSource(Mapping[str, np.ndarray]):
    """The tensors of a checkpoint by name, read lazily (each `[name]` reads one tensor).

    `shape(name)` and `file_of(name)` answer without reading the data. Use as a context
    manager, or call `close()`, to release the files.
    """

    def __init__(self, weights: str | Path):
        self.path = Path(weights)
        self._where: dict[str, Path] = {}
        self._safetensors: dict[Path, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}  # of the safetensors tensors, from the header
        self._entries: dict[str, _Entry] = {}
        self._torch: dict[Path, _TorchZip] = {}
        files = self._shards(self.path) if self.path.name.endswith(".index.json") else None
        try:
            for f in files or [self.path]:
                self._open(f)
        except BaseException:
            self.close()  # the shards opened before the bad one
            raise

    def _open(self, f: Path) -> None:
        """Opens one weight file (after checking what it states) and records its tensors."""
        if f.name.endswith(".safetensors"):
            entries = _safetensors_entries(f)
            self._entries.update(entries)
            self._shapes.update({n: e.shape for n, e in entries.items()})
            names = list(entries)
            try:
                handle = safe_open(str(f), framework="np")
            except BaseException as e:  # the Rust reader can panic (a BaseException)
                if isinstance(e, KeyboardInterrupt | SystemExit):
                    raise
                raise CheckpointError(
                    f"{f} is not a readable safetensors file: {_describe(e)}"
                ) from None
            self._safetensors[f] = handle
        else:
            zf = _TorchZip(f)
            self._torch[f] = zf
            names = list(zf.tensors)
        for n in names:
            self._where[n] = f

    @staticmethod
    def _shards(index_path: Path) -> list[Path]:
        index = read_json(index_path, "its shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no 'weight_map' of tensor name -> shard file")
        shards = []
        for name in dict.fromkeys(weight_map.values()):
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(
                    f"{index_path}: the weight_map names shard {name!r}; shards are file names "
                    "in the index's own directory"
                )
            shard = index_path.parent / name
            if not shard.is_file():
                raise FileNotFoundError(f"{index_path} names shard {name}, but {shard} is missing")
            shards.append(shard)
        return shards

    def __getitem__(self, name: str) -> np.ndarray:
        f = self._where[name]
        if f not in self._safetensors:
            array = self._torch[f].read(name)
            read_counter.add(array.nbytes)
            return array
        try:
            array = self._safetensors[f].get_tensor(name)
        except BaseException as e:  # the Rust reader can panic (a BaseException)
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            raise CheckpointError(f"{f}: tensor {name!r} cannot be read: {_describe(e)}") from None
        read_counter.add(array.nbytes)
        return array

    def lazy(self, name: str) -> Any:
        """The tensor `name` as an `lmflax.hf.lazy.View`: nothing is read until a block of it
        is (`view.read(index)`), and then only that block's bytes. A tensor of a PyTorch .bin
        archive has no such view: it is read whole (this one tensor) and returned as an array."""
        f = self._where[name]
        if f not in self._safetensors:
            return self[name]
        e = self._entries[name]
        return View(Blob(f, e.start, e.dtype, e.shape, name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._where[name]
        if f in self._safetensors:
            return self._shapes[name]
        return self._torch[f].tensors[name].shape

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def close(self) -> None:
        for zf in self._torch.values():
            zf.close()
        self._safetensors.clear()
        self._torch.clear()
        self._shapes.clear()
        self._entries.clear()

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line for an error message (untrusted input can make it huge)."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters (values from an untrusted file can be huge)."""
    try:
        text = repr(value)
    except Exception:  # a deeply nested value can exceed the recursion limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not float


def _shape_size(shape: tuple[int, ...]) -> int:
    size = 1
    for n in shape:
        size *= n
    return size


_MAX_BYTES = 2**62  # numpy's sizes and byte strides are int64; far above any real tensor


def _fits_numpy(shape: tuple[int, ...], itemsize: int) -> bool:
    """Whether numpy can make an array of `shape` (it refuses shapes whose nonzero dimensions
    multiply past int64, even when another dimension is 0)."""
    return _shape_size(tuple(n for n in shape if n)) * itemsize < _MAX_BYTES


# safetensors dtype names and the element types they hold (what Hugging Face checkpoints use).
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit


def _check_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header, after checking every dtype, shape
    and data offset in it against the file (CheckpointError naming the tensor and file)."""
    return {name: e.shape for name, e in _safetensors_entries(path).items()}


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A checked safetensors header entry: where its bytes start in the file, dtype, shape."""

    start: int
    dtype: np.dtype
    shape: tuple[int, ...]


def _safetensors_entries(path: Path) -> dict[str, _Entry]:
    """The checked header of a safetensors file (see `_check_safetensors_header`): each tensor's
    absolute byte offset in the file, its little-endian dtype and its shape."""
    bad = f"{path} is not a readable safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{bad}: it has {len(head)} bytes, fewer than the 8 of the header size"
            )
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise CheckpointError(
                f"{bad}: its header claims {n} bytes, but the file has {size - 8} after the size"
            )
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{bad}: its header is not valid JSON ({_describe(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: its header is a {type(header).__name__}, not an object")
    data_size = size - 8 - n
    shapes: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {_short(name)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where} is described by a {type(info).__name__}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{where} has dtype {_short(dtype)}; readable: {', '.join(_SAFETENSORS_DTYPES)}"
            )
        if not (
            isinstance(shape, list)
            and len(shape) <= _MAX_DIMS
            and all(_is_int(d) and d >= 0 for d in shape)
        ):
            raise CheckpointError(
                f"{where} has shape {_short(shape)}; a shape is a list of at most {_MAX_DIMS} "
                "non-negative integers"
            )
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise CheckpointError(
                f"{where} has data_offsets {_short(offsets)}; they must be [begin, end] with "
                f"0 <= begin <= end <= {data_size} (the bytes after the header)"
            )
        itemsize = np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        if not _fits_numpy(tuple(shape), itemsize):
            raise CheckpointError(f"{where} has shape {_short(shape)}, too large for an array")
        nbytes = _shape_size(tuple(shape)) * itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where} of dtype {dtype} and shape {shape} needs {nbytes} bytes, but its "
                f"data_offsets {offsets} span {offsets[1] - offsets[0]}"
            )
        shapes[str(name)] = _Entry(
            8 + n + offsets[0], np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder("<"), tuple(shape)
        )
    return shapes


# PyTorch's storage classes as pickled by torch.save, and the element types they hold.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _NoState:
    """Refuses pickle's BUILD opcode, which would otherwise set attributes of the objects below
    (a crafted pickle could then replace a tensor's fields, or a method, after they are made)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        # (an UnpicklingError: the reader names the file when it reports it)
        raise pickle.UnpicklingError(f"the pickle sets the state of a {type(self).__name__[1:]}")


class _StorageType(_NoState):
    __slots__ = ("dtype", "name")

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorRef(_NoState):
    """A tensor of a .bin archive, described by the pickle; its bytes are read on demand.

    The values come from an untrusted file: `_TorchZip` checks them (`check`) before any use."""

    __slots__ = ("dtype", "key", "numel", "offset", "shape", "storage", "stride")

    def __init__(self, storage: Any, offset: Any, shape: Any, stride: Any, *_ignored: object):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def check(self, where: str) -> None:
        """Checks storage, offset, shape and stride; afterwards they are plain ints and tuples
        of ints, and every element the view reads lies inside the storage."""
        storage = self.storage
        if not (
            isinstance(storage, tuple)
            and len(storage) == 3
            and isinstance(storage[0], str)
            and isinstance(storage[1], np.dtype)
            and _is_int(storage[2])
            and storage[2] >= 0
        ):
            raise CheckpointError(f"{where} has a malformed storage {_short(storage)}")
        self.key, self.dtype, self.numel = storage
        if not (_is_int(self.offset) and 0 <= self.offset <= self.numel):
            raise CheckpointError(
                f"{where} has storage offset {_short(self.offset)}; it must be an integer in "
                f"[0, {self.numel}] (the storage's length)"
            )
        for what in ("shape", "stride"):
            value = getattr(self, what)
            if not (
                isinstance(value, tuple | list)
                and len(value) <= _MAX_DIMS
                and all(_is_int(v) and v >= 0 for v in value)
            ):
                raise CheckpointError(
                    f"{where} has {what} {_short(value)}; it must be at most {_MAX_DIMS} "
                    "non-negative integers"
                )
            setattr(self, what, tuple(value))
        if len(self.stride) != len(self.shape):
            raise CheckpointError(
                f"{where} has shape {self.shape} but {len(self.stride)} strides {self.stride}"
            )
        if not _fits_numpy(self.shape, self.dtype.itemsize):
            raise CheckpointError(f"{where} has shape {_short(self.shape)}, too large for an array")
        size = _shape_size(self.shape)
        if size == 0:
            return
        if size > self.numel:
            raise CheckpointError(
                f"{where} of shape {self.shape} has more elements ({size}) than its storage "
                f"({self.numel}): an expanded or overlapping view; save a contiguous copy"
            )
        last = self.offset + sum((n - 1) * st for n, st in zip(self.shape, self.stride))
        if last >= self.numel:
            raise CheckpointError(
                f"{where} of shape {self.shape}, stride {self.stride} and storage offset "
                f"{self.offset} reads element {last}, past the end of its storage of {self.numel}"
            )


def _rebuild_parameter(data: Any, *_ignored: object) -> Any:
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    del new_type, state  # torch.nn.Parameter and friends: keep the tensor
    return func(*args)


class _Global(_NoState):
    """What a resolved global of the pickle is: a callable that can be called (REDUCE) and
    nothing else; it is neither a class (no NEWOBJ) nor this module's own function or class, so
    the pickle cannot set attributes on anything that outlives the load."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any):
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


# The globals torch.save writes for a plain state dict of tensors; nothing else resolves.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _TensorRef,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.nn.parameter", "Parameter"): None,
}


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into `_TensorRef`s. Only the globals torch.save writes for
    plain tensors are resolved; anything else is refused, so loading cannot run code."""

    def __init__(self, file: Any, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED_GLOBALS:
            fn = _ALLOWED_GLOBALS[(module, name)]
            return None if fn is None else _Global(fn)
        raise CheckpointError(
            f"{self.source}: the pickle refers to {module}.{name}, which is not part of a plain "
            "tensor state dict; only tensors are read from .bin checkpoints (convert it to "
            "safetensors with transformers if it holds other objects)"
        )

    def persistent_load(self, pid: Any) -> tuple:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(
                f"{self.source}: unexpected persistent id {_short(pid)} in the pickle"
            )
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.source}: unsupported storage type {_short(storage_type)}")
        if not (isinstance(key, str | int) and _is_int(numel) and numel >= 0):
            raise CheckpointError(
                f"{self.source}: storage {_short(key)} of {_short(numel)} elements is malformed"
            )
        return (str(key), storage_type.dtype, numel)


def _check_pickle_memo(data: bytes) -> None:
    """Refuses memo indices a pickle of this size cannot need: the C unpickler grows (and zeroes)
    its memo table to twice the index, so one crafted BINPUT could make it allocate gigabytes."""
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= int(arg) <= len(data):
            raise pickle.UnpicklingError(f"memo index {arg} in a pickle of {len(data)} bytes")
        if op.name == "STOP":
            return


class _TorchZip:
    """A torch.save zip archive (PyTorch >= 1.6): `archive/data.pkl` + `archive/data/<key>`.

    Everything read from the archive is checked before use; a damaged or crafted file raises
    CheckpointError (naming the file, and the tensor where there is one), never reads outside a
    buffer and never runs code."""

    def __init__(self, path: Path):
        self.path = path
        try:
            is_zip = zipfile.is_zipfile(path)
        except Exception as e:  # is_zipfile itself raises on some damaged end records
            raise CheckpointError(f"{path} is not a readable zip archive: {_describe(e)}") from None
        if not is_zip:
            raise CheckpointError(
                f"{path} is not a zip archive: only the zip format that torch.save writes since "
                "PyTorch 1.6 is read without torch (re-save it, or convert it to safetensors)"
            )
        try:
            self.zip = zipfile.ZipFile(path)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable zip archive: {_describe(e)}") from None
        try:
            self._load()
        except BaseException:
            self.zip.close()
            raise

    def _load(self) -> None:
        path = self.path
        self.members = {info.filename: info for info in self.zip.infolist()}
        for info in self.members.values():
            if info.compress_type != zipfile.ZIP_STORED:  # bounds what reading can allocate
                raise CheckpointError(
                    f"{path}: {_short(info.filename)} is compressed; torch.save writes its "
                    "archives uncompressed (re-save it, or convert it to safetensors)"
                )
        pkls = [n for n in self.members if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise CheckpointError(
                f"{path}: expected one data.pkl in the archive, found {_short(pkls)}"
            )
        self.prefix = pkls[0][: -len("data.pkl")]
        order = (self._read_optional("byteorder") or b"little").strip()
        if order not in (b"little", b"big"):
            raise CheckpointError(
                f"{path}: its byteorder record says {_short(order)}, not 'little' or 'big'"
            )
        self.byteorder = "<" if order == b"little" else ">"
        try:
            with self.zip.open(pkls[0]) as f:
                data = f.read()  # stored, so no larger than the file
            _check_pickle_memo(data)
            obj = _TensorUnpickler(io.BytesIO(data), path).load()
        except CheckpointError:
            raise
        except Exception as e:  # a damaged pickle or zip member: any of a dozen types
            raise CheckpointError(
                f"{path}: {pkls[0]} is not a readable tensor pickle: {_describe(e)}"
            ) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
        self.tensors: dict[str, _TensorRef] = {}
        for name, ref in obj.items():
            where = f"{path}: tensor {_short(name)}"
            if not isinstance(name, str):
                raise CheckpointError(f"{where}: tensor names are strings")
            if type(ref) is not _TensorRef:
                raise CheckpointError(f"{where} is a {type(ref).__name__}, not a tensor")
            ref.check(where)
            member = self.members.get(f"{self.prefix}data/{ref.key}")
            if member is None:
                raise CheckpointError(f"{where}: its storage {ref.key!r} is not in the archive")
            if member.file_size < ref.numel * ref.dtype.itemsize:
                raise CheckpointError(
                    f"{where}: its storage {ref.key!r} holds {member.file_size} bytes, fewer than "
                    f"the {ref.numel * ref.dtype.itemsize} of {ref.numel} {ref.dtype} elements"
                )
            self.tensors[name] = ref

    def _read_optional(self, name: str) -> bytes | None:
        info = self.members.get(self.prefix + name)
        if info is None:
            return None
        try:
            with self.zip.open(info) as f:
                return f.read(64)  # a short record
        except Exception as e:
            raise CheckpointError(
                f"{self.path}: cannot read {info.filename}: {_describe(e)}"
            ) from None

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a new array (its checked view of its storage, copied)."""
        ref = self.tensors[name]
        member = self.members[f"{self.prefix}data/{ref.key}"]
        nbytes = ref.numel * ref.dtype.itemsize
        try:
            with self.zip.open(member) as f:
                raw = f.read(nbytes)
        except Exception as e:  # damaged zip data: BadZipFile, zlib.error, EOFError, ...
            raise CheckpointError(
                f"{self.path}: tensor {name!r}: its storage {member.filename} cannot be read: "
                f"{_describe(e)}"
            ) from None
        if len(raw) != nbytes:
            raise CheckpointError(
                f"{self.path}: tensor {name!r}: its storage {member.filename} ends after "
                f"{len(raw)} of {nbytes} bytes"
            )
        dtype = ref.dtype.newbyteorder(self.byteorder) if ref.dtype.itemsize > 1 else ref.dtype
        storage = np.frombuffer(raw, dtype=dtype, count=ref.numel)
        if _shape_size(ref.shape) == 0:
            return np.zeros(ref.shape, dtype=ref.dtype)
        # Views (a slice, a transpose) index their storage with their own offset and strides;
        # ref.check proved every element they reach lies inside the storage.
        item = storage.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset :],
            shape=ref.shape,
            # (a dimension of length 1 never steps: its stride, which may be anything, is unused)
            strides=tuple(st * item if n > 1 else 0 for n, st in zip(ref.shape, ref.stride)),
            writeable=False,
        )
        return np.array(view, dtype=ref.dtype)

    def close(self) -> None:
        self.zip.close()


# ---------------------------------------------------------------------------------------------
# Writing


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes `tensors` as one safetensors file with the metadata transformers expects."""
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), {"format": "pt"})


_DTYPE_NAMES = {np.dtype(t): name for name, t in _SAFETENSORS_DTYPES.items()}
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size such as '5GB' (10^9) or '500MiB' (2^20), as transformers'
    `max_shard_size` takes them; ValueError naming the accepted forms otherwise."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        text = size.strip().upper().replace(" ", "")
        for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
            number = text.removesuffix(unit)
            if number != text:
                try:
                    value = float(number)
                except ValueError:
                    break
                if value > 0:
                    return max(1, int(value * _SIZE_UNITS[unit]))
                break
    raise ValueError(
        f"max_shard_size is {size!r}; accepted: a positive number of bytes, or a string such as "
        f"'5GB', '200MB', '500MiB' (units {', '.join(_SIZE_UNITS)})"
    )


def plan_shards(nbytes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Tensor names (in order) grouped into shards as transformers groups them: a shard is
    closed when the next tensor would take it past `max_shard_size`; a tensor larger than that
    gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in nbytes.items():
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_safetensors_stream(
    directory: Path,
    specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    tensors: Iterator[tuple[str, np.ndarray]],
    max_shard_size: int | str = "5GB",
    *,
    write: bool = True,
) -> list[Path]:
    """Writes tensors as they come into `model.safetensors`, or, past `max_shard_size`, into
    `model-0000k-of-0000n.safetensors` shards with a `model.safetensors.index.json` (the layout
    transformers writes and reads). `specs`: every tensor's dtype and shape, in the order
    `tensors` yields them (each file's header is written before its data). Only one tensor is
    held at a time. write=False consumes `tensors` without writing (the other processes of a
    multi-process export, whose gathers must run too). Returns the files written."""
    limit = parse_size(max_shard_size)
    for name, (dtype, _) in specs.items():
        if np.dtype(dtype) not in _DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which safetensors lacks")
    nbytes = {n: np.dtype(d).itemsize * _shape_size(tuple(s)) for n, (d, s) in specs.items()}
    shards = plan_shards(nbytes, limit)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    paths = [directory / n for n in names]
    if write:
        # Weights of an earlier export in another layout would shadow or contradict these.
        for old in [
            *directory.glob("model-*-of-*.safetensors"),
            *directory.glob("model.safetensors*"),
        ]:
            old.unlink()
    for path, members in zip(paths, shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        at = 0
        for name in members:
            dtype, shape = specs[name]
            header[name] = {
                "dtype": _DTYPE_NAMES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [at, at + nbytes[name]],
            }
            at += nbytes[name]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
        f = open(path, "wb") if write else None  # noqa: SIM115  (closed below)
        try:
            if f is not None:
                f.write(len(text).to_bytes(8, "little") + text)
            for want in members:
                name, array = next(tensors)
                dtype, shape = specs[want]
                if name != want or tuple(array.shape) != tuple(shape):
                    raise CheckpointError(
                        f"internal: tensor {name!r} {tuple(array.shape)} came where {want!r} "
                        f"{tuple(shape)} was planned"
                    )
                if f is not None:
                    data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
                    f.write(memoryview(data.reshape(-1).view(np.uint8)))
                del array
        finally:
            if f is not None:
                f.close()
    if write and len(paths) > 1:
        weight_map = {n: p.name for p, members in zip(paths, shards) for n in members}
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        write_json(directory / "model.safetensors.index.json", index)
    return paths if write else []
