"""Where runs live: a local (or mounted) path, or a URL, all as `etils.epath.Path`.

Everything that touches a workdir (config.json, the lock, metrics, checksums, checkpoints,
summary.json, exports) goes through `epath.Path` methods rather than `pathlib`/`os`, so a
`gs://bucket/run` workdir is written where it says instead of into a local folder 'gs:'.

Which URLs work is decided by what writes checkpoint arrays: orbax hands paths to tensorstore,
which writes local paths and `gs://` (its GCS driver) only. So:
- a plain path: local (or a mounted bucket: gcsfuse, s3fs, blobfuse);
- `file:///abs/path` (or `file://localhost/abs/path`): the local path /abs/path;
- `gs://bucket/path`: Google Cloud Storage; the files lmflax writes itself go through epath,
  which needs `gcsfs` (or TensorFlow) for gs://;
- anything else (`s3://`, `az://`, `hf://`, a typo such as `gcs://`) is refused with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from etils import epath

from lmflax.config import ConfigError

# The URL schemes a workdir may use, and why others may not.
WRITABLE_SCHEMES = ("gs",)
_UNWRITABLE = {
    "s3": "orbax (through tensorstore) writes checkpoints only to local paths and gs://",
    "az": "orbax (through tensorstore) writes checkpoints only to local paths and gs://",
    "hf": "hf:// (the Hugging Face hub) is read-only",
}
_MOUNT_HINT = "mount the bucket (gcsfuse, s3fs, mountpoint-s3, blobfuse2) and pass the mount path"


class UnsupportedPathError(ConfigError):
    """A workdir URL lmflax cannot write to (exit code 2, nothing started)."""


def url_scheme(value: str | os.PathLike) -> str | None:
    """'gs' for 'gs://bucket/run'; None for a plain path (also one with ':' in a folder name)."""
    scheme, sep, _ = os.fspath(value).partition("://")
    return scheme if sep and scheme.isidentifier() else None


def _gs_backend_problem() -> str | None:
    """Why epath cannot reach gs:// here (None: it can)."""
    if importlib.util.find_spec("tensorflow") is not None:
        return None  # epath then uses tf.io.gfile
    if importlib.util.find_spec("gcsfs") is None:
        return "epath reaches gs:// through gcsfs, which is not installed: pip install gcsfs"
    return None


def to_path(value: str | os.PathLike) -> epath.Path:
    """The epath.Path of a --workdir value (see the module docstring for what is accepted).

    Raises UnsupportedPathError for a URL that cannot hold a run, saying why and what would do.
    """
    if isinstance(value, epath.Path):
        return value
    text = os.fspath(value)
    scheme = url_scheme(text)
    if scheme is None:
        return epath.Path(text)
    rest = text[len(scheme) + 3 :]
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise UnsupportedPathError(
                f"{text!r}: a file:// URL names a local path, file:///ABS/PATH (or "
                f"file://localhost/ABS/PATH); got host {host!r}"
            )
        return epath.Path("/" + path)
    if scheme in _UNWRITABLE:
        raise UnsupportedPathError(
            f"{text!r}: {scheme}:// cannot hold a run: {_UNWRITABLE[scheme]}; {_MOUNT_HINT}"
        )
    if scheme not in WRITABLE_SCHEMES:
        raise UnsupportedPathError(
            f"{text!r} is a {scheme}:// URL, which lmflax does not know; accepted: a local "
            "path, file:///ABS/PATH, or gs://BUCKET/PATH (for other stores, "
            f"{_MOUNT_HINT})"
        )
    problem = _gs_backend_problem()
    if problem is not None:
        raise UnsupportedPathError(f"{text!r}: {problem}")
    if not rest.partition("/")[0]:
        raise UnsupportedPathError(f"{text!r} names no bucket: expected gs://BUCKET/PATH")
    return epath.Path(text)


def is_local(path: epath.Path) -> bool:
    """Whether `path` is on a local (or mounted) file system, where `os` calls work on it."""
    return url_scheme(str(path)) is None


def plain(path: epath.Path) -> Path | epath.Path:
    """A local path as a pathlib.Path (for libraries that want one); a URL as it is."""
    return Path(os.fspath(path)) if is_local(path) else path


def absolute(path: epath.Path) -> epath.Path:
    """A local path made absolute (orbax needs that); a URL as it is."""
    return epath.Path(os.path.abspath(os.fspath(path))) if is_local(path) else path


def file_size(path: epath.Path) -> int:
    """Bytes in the file at `path`. Locally os.stat: epath's stat also looks the owner up in
    the password database, which fails for a uid it lacks (containers, NFS)."""
    return os.stat(path).st_size if is_local(path) else path.stat().length


def mtime(path: epath.Path) -> float:
    """When the file at `path` was last written, by its file system's (or bucket's) clock."""
    return os.stat(path).st_mtime if is_local(path) else float(path.stat().mtime)


def is_inside(root: epath.Path, rel: str) -> bool:
    """Whether the relative path `rel` (from a file the run wrote) stays inside `root`: no
    absolute path, no '..', and locally no symlink out of it."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith("/") or ".." in parts or url_scheme(rel) is not None:
        return False
    if is_local(root):
        real = os.path.realpath(os.path.join(os.fspath(root), rel))
        base = os.path.realpath(os.fspath(root))
        return real == base or real.startswith(base + os.sep)
    return True


def replace_atomically(path: epath.Path, text: str) -> None:
    """Writes `text` to `path` so a reader never sees half of it: locally a temporary file
    renamed over it (fsynced first); on an object store one upload, which is atomic there."""
    if not is_local(path):
        path.write_text(text)
        return
    tmp = path.parent / (path.name + ".tmp")
    with open(os.fspath(tmp), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def copy_tree(src: epath.Path, dst: epath.Path) -> None:
    """Copies the folder `src` into `dst` (created), file by file, through epath."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            copy_tree(item, dst / item.name)
        else:
            (dst / item.name).write_bytes(item.read_bytes())


@contextmanager
def local_staging(target: epath.Path) -> Iterator[epath.Path]:
    """A local folder to write into that ends up at `target`: `target` itself when local; a
    temporary folder copied to `target` afterwards when it is a URL (for writers, such as
    safetensors or matplotlib, that take only local paths)."""
    if is_local(target):
        yield target
        return
    tmp = tempfile.mkdtemp(prefix="lmflax-staging-")
    try:
        yield epath.Path(tmp)
        copy_tree(epath.Path(tmp), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
