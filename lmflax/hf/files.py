"""Reading and writing the files of a Hugging Face model directory, without PyTorch.

A directory holds `config.json` and its weights as `model.safetensors`, or sharded as
`model.safetensors.index.json` + shards, or PyTorch's `pytorch_model.bin` (+ index). The .bin
files are zip archives holding a pickle whose only objects are tensors; `_TensorUnpickler`
reads exactly that subset and refuses any other object, so a checkpoint cannot run code and
torch is not needed.
"""

from __future__ import annotations

import json
import pickle
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
        self._torch: dict[Path, _TorchZip] = {}
        files = self._shards(self.path) if self.path.name.endswith(".index.json") else None
        for f in files or [self.path]:
            if f.name.endswith(".safetensors"):
                try:
                    handle = safe_open(str(f), framework="np")
                except Exception as e:
                    raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
                self._safetensors[f] = handle
                names = list(handle.keys())
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
            shard = index_path.parent / name
            if not shard.is_file():
                raise FileNotFoundError(f"{index_path} names shard {name}, but {shard} is missing")
            shards.append(shard)
        return shards

    def __getitem__(self, name: str) -> np.ndarray:
        f = self._where[name]
        if f in self._safetensors:
            return self._safetensors[f].get_tensor(name)
        return self._torch[f].read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._where[name]
        if f in self._safetensors:
            return tuple(self._safetensors[f].get_slice(name).get_shape())
        return self._torch[f].tensors[name].shape

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def close(self) -> None:
        for zf in self._torch.values():
            zf.close()
        self._safetensors.clear()
        self._torch.clear()

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorRef:
    """A tensor of a .bin archive, described by the pickle; its bytes are read on demand."""

    def __init__(self, storage: tuple, offset: int, shape: tuple, stride: tuple, *_ignored: object):
        self.key, self.dtype, self.numel = storage
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.stride = tuple(int(s) for s in stride)


def _rebuild_parameter(data: Any, *_ignored: object) -> Any:
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    del new_type, state  # torch.nn.Parameter and friends: keep the tensor
    return func(*args)


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
            return _ALLOWED_GLOBALS[(module, name)]
        raise CheckpointError(
            f"{self.source}: the pickle refers to {module}.{name}, which is not part of a plain "
            "tensor state dict; only tensors are read from .bin checkpoints (convert it to "
            "safetensors with transformers if it holds other objects)"
        )

    def persistent_load(self, pid: Any) -> tuple:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r} in the pickle")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.source}: unsupported storage type {storage_type!r}")
        return (str(key), storage_type.dtype, int(numel))


class _TorchZip:
    """A torch.save zip archive (PyTorch >= 1.6): `archive/data.pkl` + `archive/data/<key>`."""

    def __init__(self, path: Path):
        self.path = path
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path} is not a zip archive: only the zip format that torch.save writes since "
                "PyTorch 1.6 is read without torch (re-save it, or convert it to safetensors)"
            )
        self.zip = zipfile.ZipFile(path)
        pkls = [n for n in self.zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {pkls}")
        self.prefix = pkls[0][: -len("data.pkl")]
        order = self._read_optional("byteorder") or b"little"
        self.byteorder = "<" if order.strip() == b"little" else ">"
        with self.zip.open(pkls[0]) as f:
            obj = _TensorUnpickler(f, path).load()
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
        self.tensors: dict[str, _TensorRef] = {}
        for name, ref in obj.items():
            if not isinstance(ref, _TensorRef):
                raise CheckpointError(
                    f"{path}: entry {name!r} is a {type(ref).__name__}, not a tensor"
                )
            self.tensors[str(name)] = ref

    def _read_optional(self, name: str) -> bytes | None:
        try:
            return self.zip.read(self.prefix + name)
        except KeyError:
            return None

    def read(self, name: str) -> np.ndarray:
        ref = self.tensors[name]
        raw = self.zip.read(f"{self.prefix}data/{ref.key}")
        dtype = ref.dtype.newbyteorder(self.byteorder) if ref.dtype.itemsize > 1 else ref.dtype
        storage = np.frombuffer(raw, dtype=dtype, count=ref.numel)
        # Views (a slice, a transpose) index their storage with their own offset and strides.
        needed = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
        if min(ref.shape, default=1) > 0 and needed > ref.numel:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} of shape {ref.shape} overruns its storage"
            )
        item = storage.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset :],
            shape=ref.shape,
            strides=tuple(s * item for s in ref.stride),
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
