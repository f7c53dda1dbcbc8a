"""The user's own files as datasets (lmflax.data.files, issue 15 item 1): text folders, JSONL,
CSV/TSV and Parquet for every task; the same records as the same rows written as a TFDS
dataset; splits by file or by fraction; one conversion cached by content; bad files named by
file and line; and (slow) train, evaluate, kill -9 and resume exactly through train.py."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from lmflax import cli
from lmflax.config import ConfigError, DataConfig, load_config_file, override
from lmflax.data import files, sources
from lmflax.data import tasks as data_tasks
from lmflax.data.sources import DataError
from lmflax.data.tokenizers import train_tokenizer
from lmflax.tasks import make_task
from lmflax.train.metrics import read_metrics

from .conftest import ROOT, run_train


@pytest.fixture(autouse=True)
def _rbg_keys():
    """As in test_finetune: the RBG generator compiles faster on CPU (only keys change)."""
    with jax.default_prng_impl("rbg"):
        yield


# ---------------------------------------------------------------------------------------------
# Data the tests write

FILLER = [
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "actor",
    "was",
    "story",
    "and",
    "it",
    "scene",
    "music",
    "very",
    "quite",
    "this",
]
POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "brilliant", "wonderful"]
NEGATIVE = ["bad", "awful", "poor", "boring", "terrible", "sad", "dull", "horrible"]


def sentiment_rows(n: int, seed: int) -> list[dict[str, str]]:
    """{'sentence', 'label'} rows, label a class *name*; texts hold commas and quotes too."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ["negative", "positive"][int(rng.integers(2))]
        words = [str(w) for w in rng.choice(FILLER, rng.integers(3, 9))]
        words.insert(
            int(rng.integers(len(words) + 1)),
            str(rng.choice(POSITIVE if label == "positive" else NEGATIVE)),
        )
        rows.append({"sentence": f'{" ".join(words)}, "number" {i}', "label": label})
    return rows


def documents(n: int, seed: int) -> list[str]:
    """Multi-line documents of Python-like text."""
    rng = np.random.default_rng(seed)
    words = [
        "def",
        "return",
        "self",
        "value",
        "for",
        "in",
        "if",
        "else",
        "print",
        "import",
        "class",
        "lambda",
        "yield",
    ]
    return [
        "\n".join(
            " ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(rng.integers(2, 8))
        )
        + "\n"
        for _ in range(n)
    ]


def write_csv(path: Path, rows: list[dict[str, Any]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_text_dir(path: Path, docs: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        sub = path / f"part{i % 3}"  # nested: a directory is read recursively
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    (path / ".hidden.txt").write_text("never read\n")
    (path / "notes.md").write_text("not a .txt file\n")
    return path


# The same rows written as a TFDS dataset by a builder of the kind a user would write by hand:
# train.py and the tests open it by name from the data dir, like any prepared TFDS dataset.


class LmflaxTestReferenceSst(tfds.core.GeneratorBasedBuilder):
    """Sentiment rows as a TFDS classification dataset (file order kept)."""

    VERSION = tfds.core.Version("1.0.0")
    SPLITS: ClassVar[dict[str, list[dict[str, str]]]] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "sentence": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=["negative", "positive"]),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(rows) for s, rows in self.SPLITS.items()}

    def _generate_examples(self, rows):
        yield from enumerate(rows)


class LmflaxTestReferenceDocs(tfds.core.GeneratorBasedBuilder):
    """Documents as a TFDS text dataset (file order kept)."""

    VERSION = tfds.core.Version("1.0.0")
    SPLITS: ClassVar[dict[str, list[str]]] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(docs) for s, docs in self.SPLITS.items()}

    def _generate_examples(self, docs):
        for i, d in enumerate(docs):
            yield i, {"text": d}


def build_reference(cls, data_dir: Path, splits: dict[str, list]) -> None:
    cls.SPLITS = splits
    cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


# ---------------------------------------------------------------------------------------------
# Configs

TINY = {
    "model.vocab_size": 256,
    "model.num_layers": 1,
    "model.d_model": 32,
    "model.d_ff": 64,
    "data.batch_size": 8,
    "data.seq_len": 32,
    "data.shuffle_buffer": 16,
    "train.progress": False,
}


def config(name: str, data_dir: Path, **updates: Any):
    cfg, _ = load_config_file(name)
    # byte-level BPE needs 256 byte tokens plus its special ones
    vocab = {"model.vocab_size": 512} if cfg.data.tokenizer == "bpe" else {}
    return override(cfg, {**TINY, **vocab, "data.data_dir": str(data_dir), **updates})


def first_batches(task, split: str, n: int, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    it = iter(task.dataset(split, seed=3, batch_size=batch_size))
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def records(cfg, split: str) -> list[dict]:
    files.use(cfg)
    source = sources.data_source(cfg.data.dataset, split, cfg.data.data_dir)
    return [source[i] for i in range(len(source))]


def shared_tokenizer(tmp_path: Path, kind: str, texts: list[str]) -> str:
    path = tmp_path / f"{kind}.json"
    train_tokenizer(kind, iter(texts), 512 if kind == "bpe" else 256).save(path)
    return str(path)


def assert_trains_its_own_tokenizer(cfg) -> None:
    """data.tokenizer='bpe'/'wordpiece' on a file dataset: trained on its records and cached
    under the converted dataset's content-keyed name (an edited file never reuses it)."""
    task = make_task(cfg)
    assert task.tokenizer.vocab_size > 50
    key = files.cache_name(cfg.data.dataset, cfg.data.data_dir)
    assert key in cached(Path(cfg.data.data_dir))
    made = list((Path(cfg.data.data_dir) / "lmflax_tokenizers").glob(f"{key}-*.json"))
    assert len(made) == 1, made


def cached(data_dir: Path) -> list[str]:
    """Converted datasets under data_dir (lock files are not datasets)."""
    root = data_dir / files.CACHE_DIR
    return (
        sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))
        if root.exists()
        else []
    )


# ---------------------------------------------------------------------------------------------
# Same results as the same rows as a TFDS dataset


def test_csv_classification_gives_the_batches_and_eval_rows_of_the_same_rows_in_tfds(
    tmp_path, monkeypatch
):
    train, valid = sentiment_rows(120, 0), sentiment_rows(24, 1)
    tfds_dir = tmp_path / "tfds"
    build_reference(LmflaxTestReferenceSst, tfds_dir, {"train": train, "validation": valid})
    monkeypatch.setitem(
        data_tasks.DATASETS,
        "lmflax_test_reference_sst",
        data_tasks.DatasetSpec(kind="classification", text_key="sentence"),
    )
    # One tokenizer file for both: WordPiece training itself is not deterministic (tokenizers
    # 0.23 breaks ties differently from one training to the next on the same texts).
    tok = shared_tokenizer(tmp_path, "wordpiece", [r["sentence"] for r in train])
    a = make_task(
        config(
            "sst2", tfds_dir, **{"data.dataset": "lmflax_test_reference_sst", "data.tokenizer": tok}
        )
    )
    spec = f"csv:train={write_csv(tmp_path / 'train.csv', train)},validation={write_csv(tmp_path / 'valid.csv', valid)}"
    b = make_task(
        config(
            "sst2",
            tmp_path / "other",
            **{"data.dataset": spec, "data.text_key": "sentence", "data.tokenizer": tok},
        )
    )
    assert a.label_names == b.label_names == ("negative", "positive")
    assert_same_batches(first_batches(a, "train", 20), first_batches(b, "train", 20))  # > 1 epoch
    # a data shard (process_index / process_count) reads the same records too
    for task in (a, b):
        task.shard = [
            next(
                iter(task.dataset("train", seed=3, batch_size=4, process_index=1, process_count=2))
            )
            for _ in range(2)
        ]
    assert_same_batches(a.shard, b.shard)
    ea, eb = a.eval_features("validation"), b.eval_features("validation")
    assert len(ea) == len(eb) == 24
    assert_same_batches([a.collate(ea, 24)], [b.collate(eb, 24)])
    # the same rows as TSV and as JSONL (label ids, not names) are the same records
    tsv = f"tsv:train={write_csv(tmp_path / 'train.tsv', train, delimiter=chr(9))},validation={tmp_path / 'valid.csv'}"
    ids = [{**r, "label": ["negative", "positive"].index(r["label"])} for r in train]
    jsonl = f"jsonl:train={write_jsonl(tmp_path / 'train.jsonl', ids)},validation={write_jsonl(tmp_path / 'v.jsonl', valid)}"
    common = {"data.text_key": "sentence", "data.label_names": ("negative", "positive")}
    want = records(
        config("sst2", tfds_dir, **{"data.dataset": "lmflax_test_reference_sst"}), "train"
    )
    assert_trains_its_own_tokenizer(
        config("sst2", tmp_path / "other", **{"data.dataset": spec, **common})
    )
    for dataset in (spec, tsv, jsonl):
        got = records(
            config("sst2", tmp_path / "other", **{"data.dataset": dataset, **common}), "train"
        )
        assert got == want, dataset


def test_text_folder_pretraining_gives_the_batches_of_the_same_documents_in_tfds(tmp_path):
    docs, held = documents(30, 0), documents(6, 1)
    folder = write_text_dir(tmp_path / "corpus", docs)
    write_text_dir(tmp_path / "held", held)
    tok = shared_tokenizer(tmp_path, "bpe", docs)
    b = make_task(
        config(
            "gpt_tiny",
            tmp_path / "d2",
            **{
                "data.dataset": f"text:train={folder},validation={tmp_path / 'held'}",
                "data.tokenizer": tok,
            },
        )
    )
    # a directory lists its .txt files in sorted path order: part0/doc000, part0/doc003, ...
    order = sorted(range(30), key=lambda i: (i % 3, i))
    assert [r["text"].decode() for r in records(b.cfg, "train")] == [docs[i] for i in order]
    held = [held[i] for i in sorted(range(6), key=lambda i: (i % 3, i))]
    build_reference(
        LmflaxTestReferenceDocs,
        tmp_path / "tfds",
        {"train": [docs[i] for i in order], "validation": held},
    )
    a = make_task(
        config(
            "gpt_tiny",
            tmp_path / "tfds",
            **{"data.dataset": "lmflax_test_reference_docs", "data.tokenizer": tok},
        )
    )
    assert_trains_its_own_tokenizer(
        dataclasses.replace(b.cfg, data=dataclasses.replace(b.cfg.data, tokenizer="bpe"))
    )
    assert_same_batches(first_batches(a, "train", 6), first_batches(b, "train", 6))
    assert_same_batches(first_batches(a, "validation", 2), first_batches(b, "validation", 2))


def test_text_per_line_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\r\nthird\n")
    (tmp_path / "b.log").write_text("from a glob\n")
    cfg = config(
        "gpt_tiny",
        tmp_path / "d",
        **{
            "data.dataset": f"text:{tmp_path}/*",
            "data.text_per": "line",
            "data.validation_fraction": 0.0,
        },
    )
    got = [r["text"].decode() for r in records(cfg, "train")]
    assert got == ["first line", "second line", "third", "from a glob"]
    with pytest.raises(DataError, match=r"no split .validation.*validation_fraction"):
        records(cfg, "validation")


def test_validation_carved_by_fraction_is_exact_deterministic_and_order_free(tmp_path):
    rows = sentiment_rows(200, 0)
    shuffled = [rows[i] for i in np.random.default_rng(5).permutation(len(rows))]

    def split(path: Path, fraction: float):
        cfg = config(
            "sst2",
            tmp_path / "d",
            **{
                "data.dataset": f"csv:{path}",
                "data.text_key": "sentence",
                "data.validation_fraction": fraction,
            },
        )
        return [[r["sentence"] for r in records(cfg, s)] for s in ("train", "validation")]

    train, valid = split(write_csv(tmp_path / "a.csv", rows), 0.1)
    assert len(valid) == 20 and len(train) == 180
    assert sorted(train + valid) == sorted(r["sentence"].encode() for r in rows)
    by_text = [r["sentence"].encode() for r in rows]
    assert train == [t for t in by_text if t not in set(valid)]  # file order kept
    _train2, valid2 = split(write_csv(tmp_path / "b.csv", shuffled), 0.1)
    assert sorted(valid2) == sorted(valid)  # the same records, wherever they sit in the file
    assert len(split(tmp_path / "a.csv", 0.25)[1]) == 50


def test_one_conversion_cached_by_content(tmp_path, monkeypatch):
    rows = sentiment_rows(40, 0)
    path = write_csv(tmp_path / "r.csv", rows)
    cfg = config(
        "sst2", tmp_path / "d", **{"data.dataset": f"csv:{path}", "data.text_key": "sentence"}
    )
    records(cfg, "train")
    first = cached(tmp_path / "d")
    calls = []
    monkeypatch.setattr(files, "_write", lambda *a: calls.append(a))
    files._PREPARED.clear()  # a new process: only what is on disk
    records(cfg, "train")
    assert calls == [] and cached(tmp_path / "d") == first
    monkeypatch.undo()
    write_csv(path, rows[:-1])  # edited: a new conversion
    assert len(records(cfg, "train")) + len(records(cfg, "validation")) == 39
    assert len(cached(tmp_path / "d")) == 2


_PREPARE = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from lmflax.config import load_config_file, override
from lmflax.data import files
cfg, _ = load_config_file("sst2")
cfg = override(cfg, {"data.dataset": sys.argv[1], "data.data_dir": sys.argv[2],
                     "data.text_key": "sentence"})
print(files.prepare(cfg))
"""


@pytest.mark.slow
def test_processes_converting_at_once_convert_once(tmp_path):
    """Three processes start on the same new files: one converts, the others wait and reuse it
    (without the lock in sources.build_once this sees three conversions)."""
    path = write_csv(tmp_path / "r.csv", sentiment_rows(20000, 0))  # a conversion of ~1 s
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PREPARE, f"csv:{path}", str(tmp_path / "d")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert len({o.strip().splitlines()[-1] for o, _ in outs}) == 1  # one directory for all
    assert sum("converting csv:" in e for _, e in outs) == 1, [e[-600:] for _, e in outs]
    assert len(cached(tmp_path / "d")) == 1


# ---------------------------------------------------------------------------------------------
# Field mappings of the other tasks


def test_tagging_from_jsonl_lists_and_csv_strings(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(40):
        words, tags = [], []
        for _ in range(int(rng.integers(1, 4))):
            words += [str(w) for w in rng.choice(FILLER, 2)] + ["zelda", "quartermaine"]
            tags += ["O", "O", "B-PER", "I-PER"]
        words.append("paris")
        tags.append("B-LOC")
        rows.append({"tokens": words, "ner_tags": tags})
    common = {
        "data.text_key": "tokens",
        "data.label_key": "ner_tags",
        "task.num_labels": 4,
        "model.vocab_size": 160,
    }
    a = config(
        "conll2003",
        tmp_path / "d",
        **{"data.dataset": f"jsonl:{write_jsonl(tmp_path / 't.jsonl', rows)}", **common},
    )
    flat = [{"tokens": " ".join(r["tokens"]), "ner_tags": " ".join(r["ner_tags"])} for r in rows]
    b = config(
        "conll2003",
        tmp_path / "d",
        **{"data.dataset": f"csv:{write_csv(tmp_path / 't.csv', flat)}", **common},
    )
    for split in ("train", "validation"):
        assert records(a, split) == records(b, split)
    task = make_task(a)
    assert task.label_names == ("O", "B-LOC", "B-PER", "I-PER")  # 'O' first, then sorted
    rec = records(a, "train")[0]
    assert [task.label_names[t] for t in rec["ner_tags"]] == rows[0]["ner_tags"]
    assert task.eval_features("validation") and first_batches(task, "train", 1)


def test_qa_from_squad_style_jsonl_and_answer_columns(tmp_path):
    rows = []
    for i in range(30):
        context = (
            f"filler words {i}. The secret code is {['red', 'dark blue'][i % 2]}. More filler."
        )
        answer = ["red", "dark blue"][i % 2]
        rows.append(
            {
                "id": i,
                "context": context,
                "question": "What is the code?",
                "answers": {"text": [answer], "answer_start": [context.index(answer)]},
            }
        )
    common = {
        "data.text_key": "context",
        "data.seq_len": 64,
        "task.max_query_len": 16,
        "task.doc_stride": 24,
        "task.max_answer_len": 8,
    }
    a = config(
        "squad",
        tmp_path / "d",
        **{"data.dataset": f"jsonl:{write_jsonl(tmp_path / 'q.jsonl', rows)}", **common},
    )
    flat = [
        {
            "passage": r["context"],
            "q": r["question"],
            "answer_text": r["answers"]["text"][0],
            "answer_start": r["answers"]["answer_start"][0],
        }
        for r in rows
    ]
    b = config(
        "squad",
        tmp_path / "d",
        **{
            "data.dataset": f"csv:{write_csv(tmp_path / 'q.csv', flat)}",
            **common,
            "data.text_key": "passage",
            "data.fields": "question=q",
        },
    )
    ra, rb = records(a, "train"), records(b, "train")
    assert [
        (r["question"], r["answers"]["text"], list(r["answers"]["answer_start"])) for r in ra
    ] == [(r["question"], r["answers"]["text"], list(r["answers"]["answer_start"])) for r in rb]
    assert [r["context"] for r in ra] == [r["passage"] for r in rb]
    task = make_task(a)
    windows = task.eval_features("validation")
    assert windows and all(w["example"]["answers"] for w in windows)
    assert first_batches(task, "train", 1)[0]["start_positions"].max() > 0  # answers are found


def test_seq2seq_pairs_from_jsonl(tmp_path):
    rows = [{"de": f"hallo welt {i}", "en": f"hello world {i}"} for i in range(40)]
    cfg, _ = load_config_file("wmt14_de_en:tiny")
    cfg = override(
        cfg,
        {
            "data.dataset": f"jsonl:{write_jsonl(tmp_path / 'p.jsonl', rows)}",
            "data.data_dir": str(tmp_path / "d"),
            "task.source_key": "de",
            "task.target_key": "en",
            "model.vocab_size": 512,
            "data.batch_size": 4,
        },
    )
    task = make_task(cfg)
    got = records(cfg, "train")
    assert {r["de"].decode() for r in got} < {r["de"] for r in rows}
    batch = first_batches(task, "train", 1, batch_size=4)[0]
    assert batch["inputs"].shape == (4, cfg.data.seq_len) and batch["weights"].sum() > 0


def test_parquet_gives_the_records_of_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = sentiment_rows(50, 0)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    common = {"data.text_key": "sentence"}
    a = config(
        "sst2", tmp_path / "d", **{"data.dataset": f"parquet:{tmp_path / 'r.parquet'}", **common}
    )
    b = config(
        "sst2",
        tmp_path / "d",
        **{"data.dataset": f"jsonl:{write_jsonl(tmp_path / 'r.jsonl', rows)}", **common},
    )
    for split in ("train", "validation"):
        assert records(a, split) == records(b, split)


# ---------------------------------------------------------------------------------------------
# Bad files: the file, the line or row, what was expected; nothing cached

GOOD = 'sentence,label\ngood film,positive\n"bad, bad film",negative\n'
MALFORMED = [
    # (files written, dataset, overrides, expected message pieces)
    pytest.param(
        {"r.csv": "text,label\nhi,positive\n"},
        "csv:{d}/r.csv",
        {},
        ["r.csv:1:", "no column 'sentence'", "data.text_key"],
        id="csv-missing-column",
    ),
    pytest.param(
        {
            "r.jsonl": '{"sentence": "a", "label": "positive"}\n\n{"sentence": "b", "label": "negative"}\n{"sentence": "c"}\n'
        },
        "jsonl:{d}/r.jsonl",
        {},
        ["r.jsonl:4:", "no value for column 'label'", "data.label_key"],
        id="jsonl-missing-field",
    ),
    pytest.param(
        {"r.csv": GOOD, "v.csv": GOOD + "meh film,neutral\n"},
        "csv:train={d}/r.csv,validation={d}/v.csv",
        {},
        [
            "v.csv:4:",
            "label 'neutral' (column 'label', data.label_key) is not in the label set",
            "('negative', 'positive'; from the training rows)",
        ],
        id="label-not-in-set",
    ),
    pytest.param(
        {"r.csv": GOOD + "ok film,Positive\n"},
        "csv:{d}/r.csv",
        {"data.label_names": ("negative", "positive")},
        ["r.csv:4:", "label 'Positive'", "not in the label set", "from data.label_names"],
        id="label-not-in-label-names",
    ),
    pytest.param(
        {"r.csv": GOOD + "ok film,7\n"},
        "csv:{d}/r.csv",
        {"data.label_names": ("negative", "positive")},
        ["r.csv:4:", "label '7'", "is not in the label set"],
        id="label-id-out-of-range",
    ),
    pytest.param(
        {"r.csv": GOOD.encode() + b"caf\xe9 film,positive\n"},
        "csv:{d}/r.csv",
        {},
        ["r.csv:4:", "not valid UTF-8", "column 4"],
        id="csv-invalid-utf8",
    ),
    pytest.param(
        {"docs/a.txt": "fine\n", "docs/b.txt": b"line one\nline \xff two\n"},
        "text:{d}/docs",
        {"task.name": "causal_lm"},
        ["b.txt:2:", "not valid UTF-8", "column 6"],
        id="text-invalid-utf8",
    ),
    pytest.param(
        {"r.csv": GOOD + "only one field\n"},
        "csv:{d}/r.csv",
        {},
        ["r.csv:4:", "1 field, the header has 2"],
        id="csv-ragged-row",
    ),
    pytest.param(
        {"r.jsonl": '{"sentence": "a", "label": "x"}\n{"sentence": "b", label: 1}\n'},
        "jsonl:{d}/r.jsonl",
        {},
        ["r.jsonl:2:", "not valid JSON"],
        id="jsonl-invalid-json",
    ),
    pytest.param(
        {"r.jsonl": '["a", "positive"]\n'},
        "jsonl:{d}/r.jsonl",
        {},
        ["r.jsonl:1:", "expected a JSON object"],
        id="jsonl-not-an-object",
    ),
    pytest.param(
        {"r.jsonl": '{"sentence": "a", "label": [1]}\n'},
        "jsonl:{d}/r.jsonl",
        {},
        ["r.jsonl:1:", "label name or an integer id", "got list"],
        id="label-wrong-type",
    ),
    pytest.param(
        {
            "t.jsonl": '{"tokens": ["a", "b"], "ner": ["O", "O"]}\n{"tokens": ["zelda", "q", "x"], "ner": ["B-PER", "I-PER"]}\n'
        },
        "jsonl:{d}/t.jsonl",
        {"task.name": "tagging", "data.text_key": "tokens", "data.label_key": "ner"},
        ["t.jsonl:2:", "3 words", "but 2 tags", "one tag per word"],
        id="ragged-tags",
    ),
    pytest.param(
        {"r.csv": "sentence,label\n"},
        "csv:{d}/r.csv",
        {},
        ["no records", "r.csv"],
        id="csv-no-rows",
    ),
    pytest.param({}, "csv:{d}/missing.csv", {}, ["missing.csv: no such file"], id="no-such-file"),
    pytest.param(
        {"docs/a.md": "x"},
        "text:{d}/docs",
        {"task.name": "causal_lm"},
        ["holds no .txt files"],
        id="empty-folder",
    ),
]


def _write_files(root: Path, written: dict[str, str | bytes]) -> None:
    for name, content in written.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("written,dataset,updates,expected", MALFORMED)
def test_malformed_files_name_file_and_line_and_cache_nothing(
    tmp_path, monkeypatch, written, dataset, updates, expected
):
    def write(*args, **kwargs):
        raise AssertionError("a bad record was found only once writing had started")

    monkeypatch.setattr(files.FileDataset, "download_and_prepare", write)
    _write_files(tmp_path, written)
    name = "gpt_tiny" if updates.get("task.name") == "causal_lm" else "sst2"
    if updates.get("task.name") == "tagging":
        name = "conll2003"
    updates = {k: v for k, v in updates.items() if k != "task.name"}
    cfg = config(
        name,
        tmp_path / "d",
        **{"data.dataset": dataset.format(d=tmp_path), "data.text_key": "sentence", **updates},
    )
    with pytest.raises(DataError) as info:
        task = make_task(cfg)
        for split in ("train", "validation"):
            sources.data_source(cfg.data.dataset, split, cfg.data.data_dir)
        del task
    for piece in expected:
        assert piece in str(info.value), str(info.value)
    assert str(tmp_path) in str(info.value) or "no records" in str(info.value)
    assert cached(tmp_path / "d") == []  # nothing cached from a half-read file
    leftovers = list((tmp_path / "d").rglob("*.array_record*")) if (tmp_path / "d").exists() else []
    assert leftovers == []


def test_parquet_row_with_a_missing_value_names_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"sentence": "a", "label": "x"},
        {"sentence": "b", "label": "y"},
        {"sentence": "c", "label": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    cfg = config(
        "sst2",
        tmp_path / "d",
        **{"data.dataset": f"parquet:{tmp_path / 'r.parquet'}", "data.text_key": "sentence"},
    )
    with pytest.raises(DataError, match=r"r\.parquet row 3: no value for column 'label'"):
        records(cfg, "train")


def test_a_bad_file_is_exit_1_and_a_bad_file_setting_exit_2(tmp_path, capsys):
    _write_files(tmp_path, {"r.csv": GOOD + "meh,\n"})
    base = [
        "train",
        "--config=sst2",
        f"--workdir={tmp_path / 'w'}",
        f"--config.data.data_dir={tmp_path / 'd'}",
        "--config.data.text_key=sentence",
    ]
    assert cli.main([*base, f"--config.data.dataset=csv:{tmp_path / 'r.csv'}"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'r.csv'}:4:" in err and "is empty; expected a label" in err
    for bad, says in (
        (
            [f"--config.data.dataset=json:{tmp_path / 'r.csv'}"],
            "'json:' is not a file kind; use jsonl",
        ),
        (
            [f"--config.data.dataset=csv:{tmp_path / 'r.csv'}", "--config.data.text_per=para"],
            "data.text_per is 'para'",
        ),
        (["--config.data.dataset=csv:validation=x.csv"], "no 'train' split"),
        ([f"--config.data.dataset=text:{tmp_path}"], "text files hold documents only"),
    ):
        assert cli.main([*base, *bad]) == 2, bad
        assert says in capsys.readouterr().err


def test_schema_accepts_the_file_prefixes():
    for ok in (
        "csv:a.csv",
        "tsv:a.tsv",
        "jsonl:train=a.jsonl,validation=b.jsonl",
        "text:docs/**/*.txt",
        "parquet:x.parquet",
        "glue/sst2:2.0.0",
    ):
        assert DataConfig(dataset=ok).validate() == [], ok
    errs = DataConfig(
        dataset="csv:train=a.csv,oops", validation_fraction=1.5, fields="q"
    ).validate()
    assert any("'oops' is not SPLIT=PATH" in e for e in errs)
    assert any("validation_fraction must be in [0, 1)" in e for e in errs)
    assert any("'q' is not FEATURE=COLUMN" in e for e in errs)
    with pytest.raises(ConfigError, match="names no file"):
        files.plan_for(config("sst2", "/tmp", **{"data.dataset": "csv:"}))


# ---------------------------------------------------------------------------------------------
# train.py on files: train, evaluate, kill -9, resume exactly (subprocesses)

RUN = [
    "--config.model.num_layers=1",
    "--config.model.d_model=32",
    "--config.model.d_ff=64",
    "--config.data.batch_size=8",
    "--config.data.seq_len=32",
    "--config.train.steps=120",
    "--config.train.checkpoint_every=20",
    "--config.train.eval_every=40",
    "--config.train.eval_steps=4",
    "--config.train.log_every=1",
    "--config.train.progress=false",
    "--config.train.sample_tokens=0",
]


def _popen(args: list[str], data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "TFDS_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _metrics(workdir: Path, name: str) -> dict[int, dict]:
    out = {}
    for r in read_metrics(workdir / name):
        out[r["step"]] = {
            k: v for k, v in r.items() if k not in ("tokens_per_sec", "time", "wall_time")
        }
    return out


def _params(workdir: Path, step: int) -> list[bytes]:
    tree = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")["params"]
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _kill_after_checkpoint_and_resume(args: list[str], workdir: Path, data_dir: Path) -> str:
    proc = _popen([f"--workdir={workdir}", *args], data_dir)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "20").is_dir():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, "timed out waiting for checkpoint 20"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert max(_metrics(workdir, "metrics.jsonl")) < 120, "the run ended before it was killed"
    resumed = run_train([f"--workdir={workdir}", *args], str(data_dir))
    assert "resumed from" in resumed.stderr
    return resumed.stderr


@pytest.mark.slow
def test_csv_finetuning_trains_evaluates_and_resumes_exactly_after_kill(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "reviews.csv", sentiment_rows(400, 0))
    args = [
        "--config=sst2",
        *RUN,
        "--config.model.vocab_size=256",
        f"--config.data.dataset=csv:{data / 'reviews.csv'}",
        "--config.data.text_key=sentence",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = run_train([f"--workdir={straight}", *args], str(tmp_path / "tfds"))
    # The conversion's TFDS chatter stays off the first screen, as the embedded corpus's does.
    assert "Downloading and preparing" not in first.stdout + first.stderr
    _kill_after_checkpoint_and_resume(args, killed, tmp_path / "tfds")
    assert _metrics(killed, "metrics.jsonl") == _metrics(straight, "metrics.jsonl")
    evals = _metrics(straight, "eval_metrics.jsonl")
    assert sorted(evals) == [40, 80, 120] and evals[120]["examples"] == 20  # 5% of 400 rows
    assert evals[120]["accuracy"] > 0.5 + 1e-9 or evals[120]["loss"] < evals[40]["loss"]
    assert _metrics(killed, "eval_metrics.jsonl") == evals
    assert _params(killed, 120) == _params(straight, 120)
    assert len(cached(tmp_path / "tfds")) == 1  # three processes, one conversion


@pytest.mark.slow
def test_text_folder_pretraining_resumes_exactly_and_matches_the_tfds_dataset(tmp_path):
    docs, held = documents(60, 0), documents(8, 1)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(d)
    (tmp_path / "held").mkdir()
    for i, d in enumerate(held):
        (tmp_path / "held" / f"h{i}.txt").write_text(d)
    data_dir = tmp_path / "tfds"
    build_reference(LmflaxTestReferenceDocs, data_dir, {"train": docs, "validation": held})
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # one tokenizer file for both runs, so that only the data source differs
    tok = shared_tokenizer(tmp_path, "bpe", docs)
    common = [
        "--config=gpt_tiny",
        *RUN,
        "--config.model.vocab_size=512",
        f"--config.data.tokenizer={tok}",
    ]
    run_train(
        [f"--workdir={reference}", *common, "--config.data.dataset=lmflax_test_reference_docs"],
        str(data_dir),
    )
    args = [*common, f"--config.data.dataset=text:train={folder},validation={tmp_path / 'held'}"]
    _kill_after_checkpoint_and_resume(args, killed, data_dir)
    # Only data.dataset differs: same losses, evaluations and parameters as the TFDS dataset
    assert _metrics(killed, "metrics.jsonl") == _metrics(reference, "metrics.jsonl")
    assert _metrics(killed, "eval_metrics.jsonl") == _metrics(reference, "eval_metrics.jsonl")
    assert sorted(_metrics(killed, "eval_metrics.jsonl")) == [40, 80, 120]
    assert _params(killed, 120) == _params(reference, 120)
