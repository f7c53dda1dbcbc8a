"""TFDS sources: the embedded default corpus (built on first use, no download) and named datasets.

Everything is read through `tfds.data_source`, i.e. random access into ArrayRecord files, which
needs no TensorFlow. The embedded corpus, `lmflax_pystdlib`, is the text that ships with Python
itself: the standard library's source files and its documentation topics (`pydoc_data`), cut
into chunks of about 2,000 characters at blank lines. About 2% of the files (chosen by a hash of
their path) form the validation split.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds

EMBEDDED = "lmflax_pystdlib"
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "lib2to3",
}
_CHUNK_CHARS = 2000


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts):
            continue
        files.append((str(rel), p))
    return files


def _chunks(text: str, limit: int = _CHUNK_CHARS) -> Iterator[str]:
    """Splits at blank lines into pieces of at most ~limit characters (longer paragraphs whole)."""
    piece: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if piece and size + len(para) > limit:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(para)
        size += len(para) + 2
    if piece:
        yield "\n\n".join(piece)


def _is_validation(name: str) -> bool:
    return int(hashlib.md5(name.encode()).hexdigest(), 16) % 50 == 0


def _documents() -> Iterator[tuple[str, str]]:
    """(source name, text) for every document of the corpus, in a fixed order."""
    for rel, path in _stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are latin-1 test fixtures; skip, don't guess
        yield f"Lib/{rel}", text
    try:
        from pydoc_data.topics import topics  # deferred: megabytes of text, for the corpus only
    except ImportError:  # a Python built without its docs
        topics = {}
    for name in sorted(topics):
        yield f"Doc/topics/{name}", topics[name]


class LmflaxPystdlib(tfds.core.GeneratorBasedBuilder):
    """The Python standard library's sources and documentation topics as a text corpus."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Stdlib .py files and pydoc topics, ~2k-character chunks."
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "source": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # nothing to download
        return {
            "train": self._generate_examples(validation=False),
            "validation": self._generate_examples(validation=True),
        }

    def _generate_examples(self, validation: bool) -> Iterator[tuple[str, dict[str, str]]]:
        for name, text in _documents():
            if _is_validation(name) != validation:
                continue
            for i, chunk in enumerate(_chunks(text)):
                if chunk.strip():
                    yield f"{name}#{i}", {"text": chunk, "source": name}


def default_data_dir() -> str:
    """$TFDS_DATA_DIR or ~/tensorflow_datasets, as TFDS itself resolves it."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing): one process builds, the rest wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(path: Path, write: Callable[[Path], None]) -> Path:
    """Returns `path`, first making it if it is missing: `write(tmp)` writes the file at `tmp`
    under a lock on `path` (one process builds, the others wait and reuse it), and `tmp` is
    renamed to `path` only once complete, so a crash never leaves a half-written cache file."""
    if not path.exists():
        with file_lock(path.with_suffix(".lock")):
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                write(tmp)
                tmp.replace(path)
    return path


def ensure_embedded(data_dir: str) -> None:
    """Builds the embedded corpus as ArrayRecord under data_dir unless it is already there."""
    builder = LmflaxPystdlib(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return
    with file_lock(Path(data_dir) / f".{EMBEDDED}.lock"):
        builder = LmflaxPystdlib(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )


class DataError(ValueError):
    """A dataset that cannot be read as configured (missing, empty, wrong features)."""


# Readers of dataset names 'KIND:...' by KIND: reader(name, split, data_dir) -> a source.
# lmflax.data.files registers the user's file kinds ('csv', 'jsonl', ...).
READERS: dict[str, Callable[[str, str, str | None], Any]] = {}


def data_source(name: str, split: str, data_dir: str | None, *, download: bool = False) -> Any:
    """A random-access TFDS source for `split` of dataset `name` (ArrayRecord).

    The embedded corpus is built on first use. Other datasets must already be prepared in
    array_record format (`tfds build NAME --file_format=array_record`) unless download=True.
    'KIND:PATH' names the user's files, converted on first use (lmflax.data.files).
    """
    reader = READERS.get(name.split(":", 1)[0]) if ":" in name else None
    if reader is not None:
        return reader(name, split, data_dir)
    data_dir = data_dir or default_data_dir()
    if name == EMBEDDED:
        ensure_embedded(data_dir)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as e:  # TFDS raises several types for a missing dataset or split
        raise DataError(
            f"cannot open TFDS dataset {name!r} split {split!r} under {data_dir}: {e}\n"
            f"Prepare it first (tfds build {name} --file_format=array_record --data_dir={data_dir}) "
            "or set data.download=true; the embedded corpus is 'lmflax_pystdlib'."
        ) from None
    if len(source) == 0:
        raise DataError(f"TFDS dataset {name!r} split {split!r} under {data_dir} is empty")
    return source
