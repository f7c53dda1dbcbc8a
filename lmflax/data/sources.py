"""TFDS sources: the embedded default corpus (built on first use, no download) and named datasets.

Everything is read through `tfds.data_source`, i.e. random access into ArrayRecord files, which
needs no TensorFlow. The embedded corpus, `lmflax_pystdlib`, is the text that ships with Python
itself: the standard library's source files and its documentation topics (`pydoc_data`), cut
into chunks of about 2,000 characters at blank lines. About 2% of the files (chosen by a hash of
their path) form the validation split.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import importlib.util
import inspect
import io
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from lmflax.config import ConfigError

log = logging.getLogger("lmflax")

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


class _DropTfdsChatter(logging.Filter):
    """Drops TFDS's warnings below ERROR (e.g. 'Variant folder ... has no dataset_info.json',
    which it logs for a dataset directory that is about to be built)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    """While inside: TFDS's expected warnings (logged through absl's 'absl' logger) and the
    lines it prints to stdout while preparing ('Downloading and preparing dataset ...') are
    dropped; its errors still show."""
    chatter = _DropTfdsChatter()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(chatter)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logger.removeFilter(chatter)


def ensure_embedded(data_dir: str) -> None:
    """Builds the embedded corpus as ArrayRecord under data_dir unless it is already there."""
    with quiet_tfds():
        builder = LmflaxPystdlib(data_dir=data_dir, file_format="array_record")
        if builder.is_prepared():
            return
        with file_lock(Path(data_dir) / f".{EMBEDDED}.lock"):
            builder = LmflaxPystdlib(data_dir=data_dir, file_format="array_record")
            if not builder.is_prepared():
                log.info(
                    "building the embedded corpus %s (Python's own sources, no download) in %s "
                    "once",
                    EMBEDDED,
                    builder.data_dir,
                )
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                )


class DataError(ValueError):
    """A dataset that cannot be read as configured (missing, empty, wrong features)."""


class DatasetNotAvailableError(ConfigError, DataError):
    """data.dataset names no dataset, or one not prepared for reading: nothing was started,
    the CLI exits with 2 (it is a ConfigError), and it is a DataError for library callers."""


def prepare_command(name: str, data_dir: str) -> str:
    """The command line that prepares dataset `name` for lmflax under `data_dir`."""
    return f"lmflax data prepare {name} --data_dir={data_dir}"


def _base_name(name: str) -> str:
    """'wmt14_translate/de-en:1.0.0' -> 'wmt14_translate'."""
    return name.split(":")[0].split("/")[0]


def register_builder(name: str) -> bool:
    """Imports the TFDS module that defines dataset `name` when `import tensorflow_datasets`
    did not (this release skips some older modules: text/glue.py, text/conll2003/,
    translate/wmt14.py, summarization/cnn_dailymail.py, ...); True when it is registered now."""
    base = _base_name(name)
    if base in tfds.list_builders(with_community_datasets=False):
        return True
    root = Path(tfds.__file__).parent
    stems = dict.fromkeys([base, base.removesuffix("_translate")])
    for stem in stems:
        for path in [*root.glob(f"*/{stem}.py"), *root.glob(f"*/{stem}/{stem}.py")]:
            module = ".".join(
                ("tensorflow_datasets", *path.relative_to(root).with_suffix("").parts)
            )
            try:
                importlib.import_module(module)
            except Exception:  # a module that needs what is not installed: not this one
                continue
            if base in tfds.list_builders(with_community_datasets=False):
                return True
    return False


def known_datasets() -> list[str]:
    """The TFDS datasets this installation knows (no community datasets: no network)."""
    return sorted({*tfds.list_builders(with_community_datasets=False), EMBEDDED})


def describe_unavailable(name: str, split: str, data_dir: str) -> str:
    """Why `split` of dataset `name` cannot be read from `data_dir`, in one short message: the
    name, the closest known names, whether TFDS has it but it is not prepared here (or not in
    array_record format), and the command that prepares it."""
    base = _base_name(name)
    registered = register_builder(name)
    on_disk = (Path(data_dir) / base).is_dir()
    if not registered and not on_disk:
        known = known_datasets()
        close = difflib.get_close_matches(base, known, n=4, cutoff=0.6)
        # ... and names that share its first 4 letters ('wikitext103' -> 'wiki40b', 'wikipedia')
        close += [n for n in known if len(base) >= 4 and n.startswith(base[:4]) and n not in close]
        close = close[:6]
        return (
            f"data.dataset={name!r} is not a dataset TFDS knows, and there is none under "
            f"{data_dir}."
            + (f" Closest TFDS names: {', '.join(close)}." if close else "")
            + f" The embedded corpus (no download) is {EMBEDDED!r}; "
            "`python -c 'import tensorflow_datasets as tfds; print(tfds.list_builders())'` "
            "lists all of TFDS's."
        )
    try:
        with quiet_tfds():
            builder = tfds.builder(name, data_dir=data_dir)
            prepared = builder.is_prepared()
            info = builder.info
    except Exception as e:  # an unknown config or version, or an unreadable dataset_info.json
        return f"TFDS cannot open dataset {name!r} under {data_dir}: {e}"
    if not prepared:
        return (
            f"TFDS dataset {name!r} is not prepared under {data_dir} (nothing at "
            f"{builder.data_dir}). Prepare it once with:\n  {prepare_command(name, data_dir)}\n"
            "or set data.download=true to prepare it on first use."
        )
    fmt = getattr(info.file_format, "value", info.file_format)
    if fmt != "array_record":
        return (
            f"TFDS dataset {name!r} is prepared at {builder.data_dir} in the {fmt} format, which "
            "lmflax cannot read by random access; prepare it as array_record with:\n  "
            f"{prepare_command(name, data_dir)} --overwrite"
        )
    splits = sorted(info.splits.keys())
    if split not in info.splits:
        return (
            f"TFDS dataset {name!r} at {builder.data_dir} has no split {split!r}"
            f"{_suggest(split, splits)}; it has: {', '.join(splits)}"
        )
    return f"TFDS cannot read split {split!r} of dataset {name!r} at {builder.data_dir}"


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name.split("[")[0], options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Readers of dataset names 'KIND:...' by KIND: reader(name, split, data_dir) -> a source.
# lmflax.data.files registers the user's file kinds ('csv', 'jsonl', ...).
READERS: dict[str, Callable[[str, str, str | None], Any]] = {}


def data_source(name: str, split: str, data_dir: str | None, *, download: bool = False) -> Any:
    """A random-access TFDS source for `split` of dataset `name` (ArrayRecord).

    The embedded corpus is built on first use. Other datasets must already be prepared in
    array_record format (`lmflax data prepare NAME`) unless download=True. A dataset that
    cannot be opened raises DatasetNotAvailableError saying why and how to prepare it.
    'KIND:PATH' names the user's files, converted on first use (lmflax.data.files).
    """
    reader = READERS.get(name.split(":", 1)[0]) if ":" in name else None
    if reader is not None:
        return reader(name, split, data_dir)
    data_dir = data_dir or default_data_dir()
    if name == EMBEDDED:
        ensure_embedded(data_dir)
    else:
        register_builder(name)
    try:
        with quiet_tfds() if not download else contextlib.nullcontext():
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as e:  # TFDS raises several types for a missing dataset or split
        message = describe_unavailable(name, split, data_dir)
        if download:
            message += f" (preparing it failed: {e})"
        raise DatasetNotAvailableError(message) from None
    if len(source) == 0:
        raise DataError(f"TFDS dataset {name!r} split {split!r} under {data_dir} is empty")
    return source


def _needs_missing_tensorflow(builder: Any) -> bool:
    """Whether `builder`'s module uses TensorFlow (lm1b's reads its downloads with tf.io.gfile)
    while TensorFlow is not installed: preparing would download, then fail."""
    if importlib.util.find_spec("tensorflow") is not None:
        return False
    module = sys.modules.get(type(builder).__module__)
    try:
        text = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return False
    return bool(re.search(r"^\s*(import tensorflow\b|from \S+ import tensorflow\b)", text, re.M))


def _tensorflow_hint(name: str, data_dir: str) -> str:
    return (
        f"TFDS's builder for {name!r} needs TensorFlow to prepare the dataset (it reads its "
        "downloaded files through tf.io), and TensorFlow is not installed: lmflax reads prepared "
        "ArrayRecord files without it, so it is needed only for this one step. Install it, "
        f"prepare, and uninstall it if you like:\n  pip install tensorflow-cpu\n  "
        f"{prepare_command(name, data_dir)}"
    )


def prepare(
    name: str,
    data_dir: str | None = None,
    *,
    manual_dir: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Prepares TFDS dataset `name` under `data_dir` in the array_record format lmflax reads
    (downloading what its builder downloads, or reading `manual_dir` for builders that take
    manually downloaded files); returns the prepared directory. Already prepared: nothing to do
    unless `overwrite`, which regenerates it (keeping the downloads).

    Raises DatasetNotAvailableError for a name TFDS does not know, and DataError when the
    builder needs TensorFlow and it is missing (said before anything is downloaded)."""
    data_dir = data_dir or default_data_dir()
    if name == EMBEDDED:
        ensure_embedded(data_dir)
        return Path(LmflaxPystdlib(data_dir=data_dir, file_format="array_record").data_dir)
    if not register_builder(name):
        raise DatasetNotAvailableError(describe_unavailable(name, "train", data_dir))
    try:
        with quiet_tfds():
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
            target = Path(builder.data_dir)
            prepared = builder.is_prepared()
    except ModuleNotFoundError as e:
        if "tensorflow" in str(e):
            raise DataError(_tensorflow_hint(name, data_dir)) from None
        raise DataError(f"TFDS's builder for {name!r} needs a module not installed: {e}") from None
    except Exception as e:  # an unknown config or version of a known dataset
        raise DatasetNotAvailableError(f"TFDS cannot make a builder for {name!r}: {e}") from None
    if prepared and not overwrite:
        fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
        if fmt == "array_record":
            log.info("%s is already prepared at %s", name, target)
            return target
        raise DataError(
            f"{name!r} is prepared at {target} in the {fmt} format; pass --overwrite to "
            "regenerate it as array_record (the downloads are kept)"
        )
    if _needs_missing_tensorflow(builder):
        raise DataError(_tensorflow_hint(name, data_dir))
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False, download_mode=mode
    )
    log.info("preparing %s as array_record in %s", name, target)
    try:
        with quiet_tfds():
            builder.download_and_prepare(download_config=config)
    except ModuleNotFoundError as e:
        if "tensorflow" in str(e):
            raise DataError(_tensorflow_hint(name, data_dir)) from None
        raise
    log.info(
        "prepared %s: %s",
        name,
        ", ".join(f"{k} {v.num_examples:,}" for k, v in sorted(builder.info.splits.items())),
    )
    return target
