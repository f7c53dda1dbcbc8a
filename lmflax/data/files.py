"""The user's own files as datasets: `data.dataset='KIND:PATH'`, converted once to ArrayRecord.

Kinds: 'text' (a directory of .txt files, a glob or a file; one document per file, or per
non-blank line with data.text_per='line'), 'jsonl' (one JSON object per line), 'csv' / 'tsv'
(a header row, then one record per row; a '.tsv' file is tab-separated and a '.csv' file
comma-separated under either kind, other names as the kind says),
'parquet' (needs the `pyarrow` package, imported only for these) and 'hf-disk' (a folder
written by Hugging Face `datasets`' `save_to_disk`, read with the `datasets` package, imported
only for these: a DatasetDict's splits are the dataset's splits, except that a lone 'train' is
carved like one file; a `ClassLabel` column's ids are read as its names, in its id order). `KIND:train=P,validation=Q`
gives each split its own files; otherwise data.validation_fraction of the records (the ones
whose content hashes lowest: deterministic, independent of file order, duplicates together)
form the 'validation' split and the rest 'train'.

The columns a task reads become typed TFDS features named as that task reads them, so the
records are the same as those of a TFDS dataset with these features and go through the same
pipelines, sharding, resume and evaluation:

  causal_lm / mlm / word2vec   text_key: text
  classification               text_key: text; label_key: ClassLabel (a name or an id)
  tagging                      text_key: words; label_key: one tag per word (lists, or
                               whitespace-separated strings in CSV)
  qa                           text_key: context; 'question': text; 'answers': SQuAD-style,
                               {'text': [...], 'answer_start': [...]} (or one of each), or the
                               columns 'answer_text' and 'answer_start'
  seq2seq, instruct            task.source_key, task.target_key: texts

A feature is read from the column of its name unless data.fields maps it ('question=query').
Labels: data.label_names fixes the label set in id order; without it the set is the training
rows' distinct labels, sorted (ids 0..max when every label is an integer).

Conversion reads every record twice (check and collect labels, then write) into a temporary
directory renamed into data_dir/lmflax_files/ only when complete, under a lock; the cache key
is the SHA-256 of the files' bytes and of the settings above. A bad record raises `DataError`
naming the file, the line (row for Parquet) and what was expected, and leaves nothing cached.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from lmflax.config import Config, ConfigError
from lmflax.config.schema import FILE_KINDS, field_map, file_dataset_splits
from lmflax.data import sources
from lmflax.data.sources import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
CACHE_DIR = "lmflax_files"
BUILDER = "lmflax_files"
_EXTENSIONS = {
    "text": (".txt",),
    "jsonl": (".jsonl",),
    "csv": (".csv", ".tsv"),
    "tsv": (".tsv",),
    "parquet": (".parquet",),
    "hf-disk": (),
}
_LM_TASKS = ("causal_lm", "mlm", "word2vec")


def is_file_dataset(name: str) -> bool:
    """Whether data.dataset `name` names files ('csv:reviews.csv') rather than a TFDS dataset."""
    kind, sep, _ = name.partition(":")
    return bool(sep) and kind in FILE_KINDS


# ---------------------------------------------------------------------------------------------
# What to read: fields of the task, files of each split


@dataclasses.dataclass(frozen=True)
class Field:
    """One feature of the converted records. kind: 'text', 'label' (ClassLabel), 'words' (a
    sequence of texts), 'tags' (a sequence of ClassLabel), 'answers' (SQuAD answers)."""

    feature: str
    column: str
    kind: str
    setting: str  # the config field that names it, for error messages


def task_fields(cfg: Config) -> list[Field]:
    """The features task `cfg.task.name` reads from a record, and the file columns they come
    from. ConfigError for a task that no file dataset can serve."""
    d, task = cfg.data, cfg.task.name
    names = field_map(d.fields)

    def f(feature: str, kind: str, setting: str) -> Field:
        return Field(feature, names.get(feature, feature), kind, setting)

    if task in _LM_TASKS:
        return [f(d.text_key, "text", "data.text_key")]
    if task == "classification":
        return [f(d.text_key, "text", "data.text_key"), f(d.label_key, "label", "data.label_key")]
    if task == "tagging":
        return [f(d.text_key, "words", "data.text_key"), f(d.label_key, "tags", "data.label_key")]
    if task == "qa":
        return [
            f(d.text_key, "text", "data.text_key"),
            f("question", "text", "data.fields question=..."),
            f("answers", "answers", "data.fields answers=..."),
        ]
    if task in ("seq2seq", "instruct"):
        return [
            f(cfg.task.source_key, "text", "task.source_key"),
            f(cfg.task.target_key, "text", "task.target_key"),
        ]
    raise ConfigError(
        f"task {task!r} cannot read a file dataset (data.dataset={d.dataset!r}); file datasets "
        f"serve {', '.join((*_LM_TASKS, 'classification', 'tagging', 'qa', 'seq2seq', 'instruct'))}"
    )


def expand(pattern: str, kind: str) -> list[Path]:
    """The files `pattern` names: a file, a directory (its files with the kind's extensions,
    recursively, hidden ones skipped) or a glob ('**' recursive); sorted. DataError if none."""
    path = Path(os.path.expanduser(pattern))
    if kind == "hf-disk":
        return [_hf_disk_folder(pattern)]
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    elif path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in _EXTENSIONS[kind]
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(
                f"{pattern}: the directory holds no {'/'.join(_EXTENSIONS[kind])} files (give a "
                f"glob, e.g. '{kind}:{Path(pattern) / '**' / '*.md'}', for other names)"
            )
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{pattern}: no such file or directory (data.dataset)")
    if not files:
        raise DataError(f"{pattern}: the glob matches no files (data.dataset)")
    return files


def _hf_disk_folder(pattern: str) -> Path:
    path = Path(os.path.expanduser(pattern))
    if not path.is_dir():
        raise DataError(f"{pattern}: no such directory (data.dataset 'hf-disk:' names a folder)")
    if not any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        raise DataError(
            f"{pattern}: not a folder written by datasets' save_to_disk (it has neither "
            "dataset_dict.json nor state.json)"
        )
    return path


def _digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in paths:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading raw records: (where, {column: value}) with `where` = 'FILE:LINE' or 'FILE row N'

_UTF8 = codecs.getincrementaldecoder("utf-8")


def _bad_utf8(path: Path, line: int, e: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{path}:{line}: not valid UTF-8 ({e.reason}: byte {e.object[e.start : e.start + 1]!r} "
        f"at column {e.start + 1}); lmflax reads text files as UTF-8"
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline) of a UTF-8 file, a BOM dropped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _bad_utf8(path, n, e) from None
            if n == 1:
                line = line.removeprefix("\ufeff")
            yield n, line


def _read_whole(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        e = UnicodeDecodeError("utf-8", raw[e.start - col : e.end], col, col + 1, e.reason)
        raise _bad_utf8(path, line, e) from None


def _text_records(path: Path, key: str, per: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if per == "file":
        text = _read_whole(path)
        if text.strip():
            yield str(path), {key: text}
        return
    for n, line in _lines(path):
        line = line.rstrip("\r\n")
        if line.strip():
            yield f"{path}:{n}", {key: line}


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(value, dict):
            raise DataError(
                f'{path}:{n}: expected a JSON object ({{"column": value, ...}}), got '
                f"{type(value).__name__}"
            )
        yield f"{path}:{n}", value


def _csv_records(path: Path, kind: str, columns: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    delimiter = "\t" if suffix == ".tsv" or (kind == "tsv" and suffix != ".csv") else ","
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents longer than 128 KiB
    numbered = _lines(path)
    current = [0]

    def lines() -> Iterator[str]:
        for n, line in numbered:
            current[0] = n
            yield line

    reader = csv.reader(lines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty; expected a header row") from None
    except csv.Error as e:
        raise DataError(f"{path}:{current[0]}: not valid CSV ({e})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(
            f"{path}:1: no column {', '.join(map(repr, missing))} in the header; the header has "
            f"{header} (set data.text_key / data.label_key / data.fields)"
        )
    start = current[0]
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{current[0]}: not valid CSV ({e})") from None
        if not row:
            start = current[0]
            continue
        where = f"{path}:{start + 1}"
        start = current[0]
        if len(row) != len(header):
            raise DataError(
                f"{where}: {len(row)} field{'s' * (len(row) != 1)}, the header has {len(header)}"
            )
        yield where, dict(zip(header, row))


def _parquet_records(
    path: Path, columns: list[str], optional: list[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq  # optional: only Parquet needs it
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs the 'pyarrow' package (pip install pyarrow)"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))}; its columns are {names} "
            "(set data.text_key / data.label_key / data.fields)"
        )
    columns = [*columns, *(c for c in optional if c in names and c not in columns)]
    n = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"{path} row {n}", row


def _load_from_disk(path: Path) -> Any:
    """The `datasets.Dataset` or `DatasetDict` saved at `path`."""
    try:
        import datasets  # optional: only 'hf-disk:' folders need it
    except ImportError:
        raise DataError(
            f"{path}: reading a save_to_disk folder needs the 'datasets' package "
            "(pip install datasets)"
        ) from None
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ArrowInvalid, JSON errors, ...
        raise DataError(f"{path}: not a readable datasets save_to_disk folder ({e})") from None


def _class_names(feature: Any) -> tuple[str, ...] | None:
    """The names of a ClassLabel feature, or of a sequence of them; None for other features."""
    inner = getattr(feature, "feature", feature)  # Sequence(ClassLabel) / List(ClassLabel)
    names = getattr(inner, "names", None)
    return tuple(names) if names else None


def hf_disk_splits(path: Path) -> dict[str, list[Path]]:
    """The splits of a save_to_disk folder: {split: [its folder]}, or {'': [path]} for one
    Dataset (or a DatasetDict with only 'train'), whose validation split is carved off."""
    index = path / "dataset_dict.json"
    if not index.is_file():
        return {"": [path]}
    try:
        names = json.loads(index.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{index}: not a datasets split index ({e!r})") from None
    if not isinstance(names, list) or "train" not in names:
        raise DataError(f"{index}: the DatasetDict has splits {names}, none named 'train'")
    if names == ["train"]:
        return {"": [path / "train"]}
    return {str(n): [path / str(n)] for n in names}


def hf_disk_label_names(path: Path, column: str) -> tuple[str, ...] | None:
    """The ClassLabel names of `column` in a save_to_disk folder (None if not a ClassLabel)."""
    ds = _load_from_disk(path)
    feature = ds.features.get(column) if hasattr(ds, "features") else None
    return None if feature is None else _class_names(feature)


def _hf_disk_records(path: Path, columns: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    ds = _load_from_disk(path)
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):
        raise DataError(
            f"{path}: a DatasetDict; give its folder as 'hf-disk:DIR' or each split's "
            "folder as 'hf-disk:train=DIR/train,validation=DIR/validation'"
        )
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))}; its columns are "
            f"{ds.column_names} (set data.text_key / data.label_key / data.fields)"
        )
    names = {c: _class_names(f) for c, f in ds.features.items()}
    for n, row in enumerate(ds, start=1):
        for column, labels in names.items():
            value = row.get(column)
            if labels is None or value is None:
                continue
            if isinstance(value, list):
                row[column] = [labels[v] if 0 <= v < len(labels) else v for v in value]
            elif 0 <= value < len(labels):
                row[column] = labels[value]
        yield f"{path} row {n}", row


def raw_records(
    kind: str, path: Path, columns: list[str], optional: list[str], text_per: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of one file, each with where it is ('FILE:LINE', 'FILE row N'); `columns`
    must be in a CSV header or Parquet schema, `optional` are read where present."""
    if kind == "text":
        return _text_records(path, columns[0], text_per)
    if kind == "jsonl":
        return _jsonl_records(path)
    if kind in ("csv", "tsv"):
        return _csv_records(path, kind, columns)
    if kind == "hf-disk":
        return _hf_disk_records(path, columns)
    return _parquet_records(path, columns, optional)


# ---------------------------------------------------------------------------------------------
# Raw values -> feature values


def _get(where: str, row: dict[str, Any], field: Field, column: str | None = None) -> Any:
    column = column or field.column
    if column not in row or row[column] is None:
        present = sorted(k for k, v in row.items() if v is not None)
        raise DataError(
            f"{where}: no value for column {column!r} ({field.setting}); the record has {present}"
        )
    return row[column]


def _text(where: str, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} should be a string, got {type(value).__name__} {value!r}")
    return value


def _label_str(where: str, value: Any, what: str) -> str:
    """A label as text: a name, or an integer id written in decimal."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(
            f"{where}: {what} should be a label name or an integer id, got "
            f"{type(value).__name__} {value!r}"
        )
    return str(value).strip()


def _sequence(where: str, value: Any, what: str) -> list[Any]:
    """A list as given, or a whitespace-separated string (CSV cells) split."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list | tuple):
        return list(value)
    raise DataError(
        f"{where}: {what} should be a list or a whitespace-separated string, got "
        f"{type(value).__name__}"
    )


def _answers(where: str, row: dict[str, Any], field: Field, names: dict[str, str]) -> Any:
    """SQuAD answers as ([texts], [starts]): from an 'answers' value or the answer_text /
    answer_start columns."""
    text_col = names.get("answer_text", "answer_text")
    start_col = names.get("answer_start", "answer_start")
    if row.get(field.column) is None and row.get(text_col) is not None:
        value: Any = {"text": row[text_col], "answer_start": row.get(start_col, -1)}
    else:
        value = _get(where, row, field)
        if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
            try:
                value = json.loads(value)  # JSON in a CSV cell
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: column {field.column!r} is not valid JSON ({e.msg})"
                ) from None
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        value = {
            "text": [v.get("text") for v in value],
            "answer_start": [v.get("answer_start", -1) for v in value],
        }
    if not isinstance(value, dict) or "text" not in value:
        raise DataError(
            f"{where}: column {field.column!r} should hold SQuAD answers "
            '({"text": [...], "answer_start": [...]}), or give columns '
            f"{text_col!r} and {start_col!r}; got {value!r}"[:400]
        )
    texts = value["text"] if isinstance(value["text"], list) else [value["text"]]
    starts = value.get("answer_start", -1)
    starts = starts if isinstance(starts, list) else [starts] * len(texts)
    if len(starts) != len(texts):
        raise DataError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    out_t, out_s = [], []
    for t, s in zip(texts, starts):
        out_t.append(_text(where, t, "an answer text"))
        try:
            out_s.append(int(s) if not isinstance(s, bool) and s != "" else -1)
        except (TypeError, ValueError):
            raise DataError(f"{where}: answer_start should be an integer, got {s!r}") from None
    return {"text": out_t, "answer_start": np.asarray(out_s, np.int32)}


def convert(
    where: str, row: dict[str, Any], fields: list[Field], names: dict[str, str]
) -> dict[str, Any]:
    """One raw record -> its feature values; labels stay strings here (ids come later)."""
    out: dict[str, Any] = {}
    for field in fields:
        what = f"column {field.column!r} ({field.setting})"
        if field.kind == "answers":
            out[field.feature] = _answers(where, row, field, names)
            continue
        value = _get(where, row, field)
        if field.kind == "text":
            out[field.feature] = _text(where, value, what)
        elif field.kind == "label":
            out[field.feature] = _label_str(where, value, what)
            if not out[field.feature]:
                raise DataError(f"{where}: {what} is empty; expected a label")
        elif field.kind == "words":
            out[field.feature] = [
                _text(where, w, f"every word of {what}") for w in _sequence(where, value, what)
            ]
        elif field.kind == "tags":
            out[field.feature] = [
                _label_str(where, t, f"every tag of {what}") for t in _sequence(where, value, what)
            ]
    words = [f for f in fields if f.kind == "words"]
    tags = [f for f in fields if f.kind == "tags"]
    if words and tags:
        w, t = out[words[0].feature], out[tags[0].feature]
        if len(w) != len(t):
            raise DataError(
                f"{where}: {len(w)} words ({words[0].setting} {words[0].column!r}) but {len(t)} "
                f"tags ({tags[0].setting} {tags[0].column!r}); expected one tag per word"
            )
    return out


class LabelSet:
    """The label names of one label field, in id order, and the lookup name-or-id -> id."""

    def __init__(self, names: tuple[str, ...], source: str):
        self.names = names
        self.source = source
        self._ids = {n: i for i, n in enumerate(names)}

    @staticmethod
    def infer(seen: set[str], given: tuple[str, ...], kind: str) -> LabelSet:
        if given:
            return LabelSet(tuple(given), "data.label_names")
        if seen and all(re.fullmatch(r"\d+", s) for s in seen):
            top = max(int(s) for s in seen)
            return LabelSet(tuple(str(i) for i in range(top + 1)), "the training rows (ids)")
        ordered = sorted(seen)
        if kind == "tags" and "O" in seen:  # the BIO convention: 'O' is tag 0
            ordered = ["O", *(n for n in ordered if n != "O")]
        return LabelSet(tuple(ordered), "the training rows")

    def id(self, where: str, label: str, field: Field) -> int:
        """The id of `label` (a name, or an id in decimal) read at `where` from `field`."""
        if label in self._ids:
            return self._ids[label]
        if re.fullmatch(r"\d+", label) and int(label) < len(self.names):
            return int(label)
        shown = ", ".join(map(repr, self.names[:20])) + (", ..." if len(self.names) > 20 else "")
        what = "tag" if field.kind == "tags" else "label"
        raise DataError(
            f"{where}: {what} {label!r} (column {field.column!r}, {field.setting}) is not in "
            f"the label set ({shown}; from {self.source}); set data.label_names to the full "
            "set, in id order"
        )


# ---------------------------------------------------------------------------------------------
# Conversion


class FileDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder over converted file records (given, not defined by a class)."""

    name = BUILDER
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Records of the user's files."}

    def __init__(
        self,
        *,
        features: tfds.features.FeaturesDict,
        splits: dict[str, Callable[[], Iterator[tuple[str, dict[str, Any]]]]],
        description: str,
        **kwargs: Any,
    ):
        self._features, self._splits, self._description = features, splits, description
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # disable_shuffling: the records stay in file order (TFDS would order them by key hash).
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description,
            features=self._features,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        return {name: make() for name, make in self._splits.items()}

    def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
        raise NotImplementedError  # the splits' generators are given to __init__


def _features(fields: list[Field], labels: dict[str, LabelSet]) -> tfds.features.FeaturesDict:
    spec: dict[str, Any] = {}
    for f in fields:
        if f.kind == "text":
            spec[f.feature] = tfds.features.Text()
        elif f.kind == "label":
            spec[f.feature] = tfds.features.ClassLabel(names=list(labels[f.feature].names))
        elif f.kind == "words":
            spec[f.feature] = tfds.features.Sequence(tfds.features.Text())
        elif f.kind == "tags":
            spec[f.feature] = tfds.features.Sequence(
                tfds.features.ClassLabel(names=list(labels[f.feature].names))
            )
        elif f.kind == "answers":
            spec[f.feature] = tfds.features.Sequence(
                {"text": tfds.features.Text(), "answer_start": np.int32}
            )
    return tfds.features.FeaturesDict(spec)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a conversion depends on; `key` hashes it (with the files' contents)."""

    dataset: str
    kind: str
    splits: dict[str, list[Path]]  # '' = carve 'validation' off by fraction
    fields: list[Field]
    names: dict[str, str]
    text_per: str
    fraction: float
    label_names: tuple[str, ...]

    def key(self) -> str:
        files = {split: [_digest(p) for p in paths] for split, paths in self.splits.items()}
        blob = json.dumps(
            {
                "version": FORMAT_VERSION,
                "kind": self.kind,
                "files": files,
                "fields": [dataclasses.astuple(f)[:3] for f in self.fields],
                "names": self.names,
                "text_per": self.text_per if self.kind == "text" else None,
                "fraction": self.fraction if "" in self.splits else None,
                "label_names": list(self.label_names),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def stem(self) -> str:
        first = next(iter(self.splits.values()))[0]
        return re.sub(r"[^\w-]", "_", f"{self.kind}-{first.stem}")[:48]

    def records(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The converted records (labels as strings) of one file split, in file order."""
        columns = [f.column for f in self.fields if f.kind != "answers"]
        optional = []
        if any(f.kind == "answers" for f in self.fields):
            optional = [
                *(f.column for f in self.fields if f.kind == "answers"),
                self.names.get("answer_text", "answer_text"),
                self.names.get("answer_start", "answer_start"),
            ]
        for path in self.splits[split]:
            for where, row in raw_records(self.kind, path, columns, optional, self.text_per):
                yield where, convert(where, row, self.fields, self.names)


def _content_hash(record: dict[str, Any], fields: list[Field]) -> bytes:
    """A record's values in field order (not their column names) hashed."""
    values = [record[f.feature] for f in fields]
    return hashlib.sha256(
        json.dumps(values, default=lambda a: np.asarray(a).tolist()).encode()
    ).digest()[:8]


def _write(plan: Plan, tmp: Path) -> None:
    """Checks every record, fixes the label sets and the carved split, then writes the TFDS
    dataset under `tmp` (removed again if anything fails)."""
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crashed conversion
    log.info("converting %s to ArrayRecord -> %s", plan.dataset, tmp.with_suffix(""))
    label_fields = [f for f in plan.fields if f.kind in ("label", "tags")]
    # split -> feature -> label -> where it first occurs
    seen: dict[str, dict[str, dict[str, str]]] = {}
    counts: dict[str, int] = {}
    hashes: list[bytes] = []
    for split in plan.splits:
        seen[split] = {f.feature: {} for f in label_fields}
        n = 0
        for where, rec in plan.records(split):
            n += 1
            for f in label_fields:
                value = rec[f.feature]
                for label in value if isinstance(value, list) else [value]:
                    seen[split][f.feature].setdefault(label, where)
            if split == "":
                hashes.append(_content_hash(rec, plan.fields))
        if n == 0:
            raise DataError(f"{plan.dataset}: no records in {[str(p) for p in plan.splits[split]]}")
        counts[split] = n
    train = "" if "" in plan.splits else "train"
    labels = {
        f.feature: LabelSet.infer(set(seen[train][f.feature]), plan.label_names, f.kind)
        for f in label_fields
    }
    for split in plan.splits:  # every label of every split is in its set, before any writing
        for f in label_fields:
            for label, where in seen[split][f.feature].items():
                labels[f.feature].id(where, label, f)
    carved: set[int] = set()
    if "" in plan.splits and plan.fraction > 0:
        n = counts[""]
        k = min(n - 1, max(1, round(plan.fraction * n)))
        if k < 1:
            raise DataError(
                f"{plan.dataset}: {n} record(s) cannot be split into train and validation "
                "(data.validation_fraction); give more records or a validation file"
            )
        carved = set(sorted(range(n), key=lambda i: (hashes[i], i))[:k])
        log.info(
            "%s: %d of %d records form the 'validation' split (data.validation_fraction=%g)",
            plan.dataset,
            k,
            n,
            plan.fraction,
        )

    def generate(split: str, keep: Callable[[int], bool]) -> Iterator[tuple[str, dict[str, Any]]]:
        for i, (where, rec) in enumerate(plan.records(split)):
            if not keep(i):
                continue
            for f in label_fields:
                value = rec[f.feature]
                rec[f.feature] = (
                    [labels[f.feature].id(where, v, f) for v in value]
                    if isinstance(value, list)
                    else labels[f.feature].id(where, value, f)
                )
            yield f"{i:012d}", rec

    splits: dict[str, Callable[[], Iterator[tuple[str, dict[str, Any]]]]] = {}
    for split in plan.splits:
        if split == "":
            splits["train"] = lambda: generate("", lambda i: i not in carved)
            if carved:
                splits["validation"] = lambda: generate("", lambda i: i in carved)
        else:
            splits[split] = lambda s=split: generate(s, lambda i: True)
    try:
        builder = FileDataset(
            features=_features(plan.fields, labels),
            splits=splits,
            description=f"lmflax file dataset {plan.dataset}",
            data_dir=str(tmp),
            file_format="array_record",
        )
        with sources.quiet_tfds():  # its "Downloading and preparing ..." lines are not ours
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# The datasets a process uses: configured by a task, prepared on first read

_CONFIGS: dict[str, Config] = {}
_PREPARED: dict[tuple[Any, ...], Path] = {}


def use(cfg: Config) -> None:
    """Makes the file dataset `cfg.data.dataset` readable through `sources.data_source` with
    the fields `cfg.task` needs (nothing is read yet). Tasks call this when they are made; in
    one process the last task made for a dataset name decides how that name is read."""
    if not is_file_dataset(cfg.data.dataset):
        return
    plan_for(cfg)  # a task that cannot read files fails here, before any work
    _CONFIGS[cfg.data.dataset] = cfg


def plan_for(cfg: Config) -> Plan:
    """What converting `cfg.data.dataset` for `cfg.task` involves (files are listed, not read)."""
    d = cfg.data
    specs = file_dataset_splits(d.dataset)
    if specs is None:
        raise ConfigError(f"data.dataset={d.dataset!r} is not a file dataset")
    kind = d.dataset.partition(":")[0]
    fields = task_fields(cfg)
    if kind == "text" and len(fields) > 1:
        raise ConfigError(
            f"data.dataset={d.dataset!r}: text files hold documents only, but task "
            f"{cfg.task.name!r} needs the fields {[f.feature for f in fields]}; give a jsonl, "
            "csv or parquet file"
        )
    splits = {split: expand(pattern, kind) for split, pattern in specs.items()}
    label_names = tuple(d.label_names)
    if kind == "hf-disk":
        if list(splits) == [""]:
            splits = hf_disk_splits(splits[""][0])
        label_field = next((f for f in fields if f.kind in ("label", "tags")), None)
        if label_field is not None and not label_names:
            # A ClassLabel fixes the label set in its own id order, as a TFDS ClassLabel does.
            train = splits.get("train", splits.get(""))
            label_names = hf_disk_label_names(train[0], label_field.column) or ()
    return Plan(
        dataset=d.dataset,
        kind=kind,
        splits=splits,
        fields=fields,
        names=field_map(d.fields),
        text_per=d.text_per,
        fraction=d.validation_fraction,
        label_names=label_names,
    )


def prepare(cfg: Config) -> Path:
    """The converted TFDS dataset directory of `cfg.data.dataset` (converting it unless a
    conversion of the same files and settings is cached under data_dir)."""
    plan = plan_for(cfg)
    data_dir = Path(cfg.data.data_dir or sources.default_data_dir())
    stats = tuple(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns)
        for paths in plan.splits.values()
        for p in paths
    )
    memo = (plan.dataset, str(data_dir), repr(plan.fields), repr(plan.names), plan.text_per,
            plan.fraction, plan.label_names, stats)  # fmt: skip
    if memo not in _PREPARED:
        dest = data_dir / CACHE_DIR / f"{plan.stem()}-{plan.key()}"
        sources.build_once(dest, lambda tmp: _write(plan, tmp))
        log.info("%s: reading the converted records in %s", plan.dataset, dest)
        _PREPARED[memo] = dest
    return _PREPARED[memo] / BUILDER / str(FileDataset.VERSION)


def _config(name: str) -> Config:
    if name not in _CONFIGS:
        raise DataError(
            f"file dataset {name!r} is read with the fields of a task: make the task first "
            "(lmflax.tasks.make_task(cfg)) or call lmflax.data.files.use(cfg)"
        )
    return _CONFIGS[name]


def builder(name: str, data_dir: str | None = None) -> Any:
    """The TFDS builder of the converted file dataset `name` (prepared on first use)."""
    cfg = _config(name)
    if data_dir is not None and cfg.data.data_dir != data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    return tfds.builder_from_directory(str(prepare(cfg)))


def data_source(name: str, split: str, data_dir: str | None) -> Any:
    """A random-access source of `split` of the file dataset `name` (as `sources.data_source`)."""
    b = builder(name, data_dir)
    if split not in b.info.splits:
        hint = (
            "set data.validation_fraction > 0 or give 'KIND:train=...,validation=...'"
            if split == "validation"
            else f"give it as '{name.partition(':')[0]}:train=...,{split}=...'"
        )
        raise DataError(
            f"file dataset {name!r} has no split {split!r} (its splits: "
            f"{', '.join(sorted(b.info.splits))}); {hint}"
        )
    return b.as_data_source(split=split)


def cache_name(dataset: str, data_dir: str | None = None) -> str:
    """A file-name-safe name for caches derived from `dataset` (tokenizers, vocabularies): a
    file dataset's converted directory name (content-keyed, so edited files never reuse a stale
    tokenizer), else the TFDS name."""
    if is_file_dataset(dataset):
        return Path(builder(dataset, data_dir).data_dir).parent.parent.name
    return dataset


for _kind in FILE_KINDS:
    sources.READERS[_kind] = data_source
