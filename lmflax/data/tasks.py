"""Input pipelines for fine-tuning: sentence classification, BIO tagging, extractive QA.

The same TFDS + grain path as pretraining (`pipeline.documents`: shuffled by seed, repeated,
this process's share), with a featurizer per task in place of packing:

- classification: [CLS] text [SEP] (or text <eos> for a decoder's tokenizer), right-padded;
- tagging: words -> WordPiece sub-tokens; a word's tag sits on its first sub-token (the other
  sub-tokens have weight 0) and predictions are read back there, one tag per word;
- QA: [CLS] question [SEP] context-window [SEP]; a context longer than a row is cut into windows
  `doc_stride` tokens apart, so they overlap; a window without the whole answer points at [CLS].

`DATASETS` says which TFDS datasets each task reads and under which feature names; register a
`DatasetSpec` there to add one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import grain.experimental as gx
import numpy as np
import tensorflow_datasets as tfds

from lmflax.config import Config, ConfigError
from lmflax.data import files, pipeline, sources
from lmflax.data.sources import DataError
from lmflax.data.tokenizers import KINDS, Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

TASK_KINDS = ("classification", "tagging", "qa")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a task finds its fields in a TFDS dataset's records.

    kind: the task that reads it ('classification', 'tagging' or 'qa'). text_key: the text
    (classification), the word sequence (tagging) or the context (QA). label_key: the ClassLabel
    (classification) or the sequence of ClassLabel tags (tagging). module: a TFDS module to
    import so that the builder is registered (older TFDS builders are not found by name
    otherwise).
    """

    kind: str
    text_key: str = "text"
    label_key: str = "label"
    question_key: str = "question"
    answers_key: str = "answers"
    module: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "glue/sst2": DatasetSpec(
        kind="classification", text_key="sentence", module="tensorflow_datasets.text.glue"
    ),
    "imdb_reviews": DatasetSpec(kind="classification", text_key="text"),
    "conll2003": DatasetSpec(
        kind="tagging",
        text_key="tokens",
        label_key="ner",
        module="tensorflow_datasets.text.conll2003",
    ),
    "squad": DatasetSpec(kind="qa", text_key="context"),
    "squad/v1.1": DatasetSpec(kind="qa", text_key="context"),
}


def dataset_spec(
    task: str, dataset: str, *, text_key: str = "text", label_key: str = "label"
) -> DatasetSpec:
    """The spec of `dataset` for `task`; ConfigError naming both if the pair is unknown. A file
    dataset ('csv:PATH', lmflax.data.files) serves any task, with the features `text_key`,
    `label_key` (data.text_key, data.label_key), 'question' and 'answers'."""
    if files.is_file_dataset(dataset):
        return DatasetSpec(kind=task, text_key=text_key, label_key=label_key)
    known = sorted(n for n, s in DATASETS.items() if s.kind == task)
    spec = DATASETS.get(dataset)
    if spec is None:
        raise ConfigError(
            f"task {task!r} does not know dataset {dataset!r} (data.dataset); datasets for "
            f"{task!r}: {', '.join(known)} (add one to lmflax.data.tasks.DATASETS)"
        )
    if spec.kind != task:
        raise ConfigError(
            f"dataset {dataset!r} (data.dataset) is a {spec.kind} dataset, task {task!r} "
            f"(task.name) cannot read it; datasets for {task!r}: {', '.join(known)}"
        )
    if spec.module:
        importlib.import_module(spec.module)
    return spec


def label_names(name: str, spec: DatasetSpec, data_dir: str | None) -> tuple[str, ...]:
    """The class (or tag) names of the dataset's label feature, from its TFDS info."""
    try:
        if files.is_file_dataset(name):
            features = files.builder(name, data_dir).info.features
        else:
            features = tfds.builder(
                name, data_dir=data_dir or sources.default_data_dir()
            ).info.features
    except DataError:
        raise
    except Exception as e:  # TFDS raises several types for unknown or unreadable datasets
        raise DataError(f"cannot read the features of TFDS dataset {name!r}: {e}") from None
    try:
        feature = features[spec.label_key]
    except KeyError:
        feature = None
    feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) -> ClassLabel
    names = getattr(feature, "names", None)
    if not names:
        raise DataError(
            f"TFDS dataset {name!r} has no class-label feature {spec.label_key!r}; "
            f"its features are {sorted(features.keys())}"
        )
    return tuple(names)


def check_num_labels(name: str, names: Sequence[str], num_labels: int) -> None:
    """ConfigError if the head's output size (task.num_labels) is not the dataset's."""
    if len(names) != num_labels:
        raise ConfigError(
            f"dataset {name!r} has {len(names)} labels ({', '.join(names)}) but the head has "
            f"task.num_labels={num_labels} outputs; set task.num_labels={len(names)}"
        )


# ---------------------------------------------------------------------------------------------
# Records -> strings


def as_str(value: Any) -> str:
    """A TFDS text value (str, bytes or 0-d array) as str."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def field_of(record: dict[str, Any], key: str, index: int | None = None) -> Any:
    if key not in record:
        raise DataError(
            f"record {index if index is not None else '?'} has no feature {key!r}; its features "
            f"are {sorted(record)}"
        )
    return record[key]


def words_and_tags(record: dict[str, Any], spec: DatasetSpec) -> tuple[list[str], list[int]]:
    """A tagging record's words and tag ids. Lengths that disagree (TFDS's mock data makes
    them) are cut to the shorter, since a word without a tag cannot be scored."""
    words = [as_str(w) for w in np.asarray(field_of(record, spec.text_key)).reshape(-1)]
    tags = [int(t) for t in np.asarray(field_of(record, spec.label_key)).reshape(-1)]
    n = min(len(words), len(tags))
    return words[:n], tags[:n]


def answers_of(record: dict[str, Any], spec: DatasetSpec) -> tuple[list[str], list[int]]:
    """A SQuAD record's gold answer texts and their character starts."""
    ans = field_of(record, spec.answers_key)
    texts = [as_str(t) for t in np.asarray(ans["text"]).reshape(-1)]
    starts = [int(s) for s in np.asarray(ans["answer_start"]).reshape(-1)]
    n = min(len(texts), len(starts))
    return texts[:n], starts[:n]


def training_texts(record: dict[str, Any], spec: DatasetSpec) -> str:
    """The text a tokenizer is trained on for one record."""
    if spec.kind == "tagging":
        return " ".join(words_and_tags(record, spec)[0])
    if spec.kind == "qa":
        return f"{as_str(field_of(record, spec.question_key))}\n{as_str(field_of(record, spec.text_key))}"
    return as_str(field_of(record, spec.text_key))


def load_task_tokenizer(cfg: Config, spec: DatasetSpec) -> Tokenizer:
    """data.tokenizer for a fine-tuning task. A kind ('wordpiece', 'bpe') is trained on the first
    tokenizer_train_docs records of the training split (their text as `training_texts` reads it)
    and cached under data_dir/lmflax_tokenizers, keyed by a hash of the first records so that
    different data never shares a cache entry. A path or 'hf:DIR' loads as in pretraining."""
    data = cfg.data
    if data.tokenizer not in KINDS:
        return pipeline.tokenizer_for(data, cfg.model.vocab_size)
    source = sources.data_source(
        data.dataset, data.train_split, data.data_dir, download=data.download
    )
    n = min(len(source), data.tokenizer_train_docs)
    digest = hashlib.sha256(str(len(source)).encode())
    for i in range(min(n, 64)):
        digest.update(training_texts(source[i], spec).encode())
    name = re.sub(
        r"[^\w.-]", "_", f"{files.cache_name(data.dataset, data.data_dir)}-{data.train_split}"
    )
    path = (
        Path(data.data_dir or sources.default_data_dir())
        / "lmflax_tokenizers"
        / f"{name}-{spec.kind}-{data.tokenizer}-{cfg.model.vocab_size}-{n}-{digest.hexdigest()[:12]}.json"
    )
    if not path.exists():
        with sources.file_lock(path.with_suffix(".lock")):
            if not path.exists():
                log.info("training a %s tokenizer on %d records -> %s", data.tokenizer, n, path)
                texts = (training_texts(source[i], spec) for i in range(n))
                tok = train_tokenizer(data.tokenizer, texts, cfg.model.vocab_size)
                tmp = path.with_suffix(".tmp")
                tok.save(tmp)
                tmp.replace(path)
    return Tokenizer.from_file(path)


# ---------------------------------------------------------------------------------------------
# Featurizers: one record -> fixed-length rows (NumPy), plus what evaluation maps back with


def _frame(tokenizer: Tokenizer, ids: Sequence[int], seq_len: int) -> tuple[list[int], int]:
    """[CLS] ids [SEP] for an encoder's tokenizer, ids <eos> for a decoder's; ids cut to fit.
    Returns the row's ids and the offset of the first content token."""
    if tokenizer.cls_id is not None and tokenizer.sep_id is not None:
        return [tokenizer.cls_id, *ids[: seq_len - 2], tokenizer.sep_id], 1
    if tokenizer.eos_id is None:
        raise DataError("a classification row needs [CLS]/[SEP] or an end-of-text token")
    return [*ids[: seq_len - 1], tokenizer.eos_id], 0


def _pad(ids: Sequence[int], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    row = np.full(seq_len, pad_id, np.int32)
    row[: len(ids)] = ids
    mask = np.zeros(seq_len, np.int32)
    mask[: len(ids)] = 1
    return row, mask


def classification_features(
    tokenizer: Tokenizer, text: str, label: int, seq_len: int
) -> dict[str, np.ndarray]:
    """-> inputs, attention_mask [L] int32; labels, weights scalars."""
    ids, _ = _frame(tokenizer, tokenizer.encode(text), seq_len)
    inputs, mask = _pad(ids, seq_len, tokenizer.pad_id)
    return {
        "inputs": inputs,
        "attention_mask": mask,
        "labels": np.int32(label),
        "weights": np.float32(1.0),
    }


def tagging_features(
    tokenizer: Tokenizer, words: Sequence[str], tags: Sequence[int], seq_len: int
) -> dict[str, np.ndarray]:
    """Words and their tags -> inputs, attention_mask, labels, weights [L] and word_starts [W]
    (the row position of each word's first sub-token; -1 for a word cut off by seq_len or that
    tokenizes to nothing). labels and weight 1 sit on first sub-tokens only."""
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise DataError("tagging needs a tokenizer with [CLS] and [SEP] (WordPiece)")
    enc = tokenizer.backend.encode(list(words), is_pretokenized=True, add_special_tokens=False)
    ids, word_ids = enc.ids[: seq_len - 2], enc.word_ids[: seq_len - 2]
    inputs, mask = _pad([tokenizer.cls_id, *ids, tokenizer.sep_id], seq_len, tokenizer.pad_id)
    labels = np.zeros(seq_len, np.int32)
    weights = np.zeros(seq_len, np.float32)
    starts = np.full(len(words), -1, np.int32)
    previous = None
    for pos, w in enumerate(word_ids, start=1):
        if w is not None and w != previous:
            starts[w] = pos
            labels[pos] = tags[w]
            weights[pos] = 1.0
        previous = w
    return {
        "inputs": inputs,
        "attention_mask": mask,
        "labels": labels,
        "weights": weights,
        "word_starts": starts,
    }


def qa_windows(
    tokenizer: Tokenizer,
    question: str,
    context: str,
    answer: tuple[int, int] | None,
    *,
    seq_len: int,
    max_query_len: int,
    doc_stride: int,
) -> list[dict[str, np.ndarray]]:
    """One question and its context -> windows, each [CLS] q [SEP] context-piece [SEP]:

    inputs, attention_mask, token_type_ids (1 on the context and its [SEP]), context_mask (1 on
    context tokens) [L]; offsets [L, 2] (character span in `context` of each context token);
    start_positions, end_positions (the answer's first and last token in the row, or 0 = [CLS]
    when the window does not hold all of `answer` = (char start, char end) or answer is None).

    Consecutive windows start doc_stride context tokens apart, so with doc_stride below the
    room for context they overlap and every answer shorter than the overlap lies whole in one.
    """
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise DataError("question answering needs a tokenizer with [CLS] and [SEP] (WordPiece)")
    q_ids = tokenizer.encode(question)[:max_query_len]
    enc = tokenizer.backend.encode(context, add_special_tokens=False)
    ctx_ids, ctx_offsets = enc.ids, enc.offsets
    room = seq_len - len(q_ids) - 3
    if room <= 0:
        raise DataError(
            f"data.seq_len={seq_len} leaves no room for context after a {len(q_ids)}-token "
            "question; raise data.seq_len or lower task.max_query_len"
        )
    first, last = None, None  # the answer's token span in the whole context
    if answer is not None:
        a_start, a_end = answer
        inside = [i for i, (s, e) in enumerate(ctx_offsets) if s < a_end and e > a_start and e > s]
        if inside:
            first, last = inside[0], inside[-1]
    windows = []
    start = 0
    while True:
        end = min(start + room, len(ctx_ids))
        ids = [tokenizer.cls_id, *q_ids, tokenizer.sep_id, *ctx_ids[start:end], tokenizer.sep_id]
        inputs, mask = _pad(ids, seq_len, tokenizer.pad_id)
        base = len(q_ids) + 2  # row position of context token `start`
        types = np.zeros(seq_len, np.int32)
        types[base : len(ids)] = 1
        context_mask = np.zeros(seq_len, np.int32)
        context_mask[base : base + end - start] = 1
        offsets = np.zeros((seq_len, 2), np.int32)
        if end > start:
            offsets[base : base + end - start] = np.asarray(ctx_offsets[start:end], np.int32)
        s_pos = e_pos = 0
        if first is not None and start <= first and last < end:
            s_pos, e_pos = base + first - start, base + last - start
        windows.append(
            {
                "inputs": inputs,
                "attention_mask": mask,
                "token_type_ids": types,
                "context_mask": context_mask,
                "offsets": offsets,
                "start_positions": np.int32(s_pos),
                "end_positions": np.int32(e_pos),
                "weights": np.float32(1.0),
            }
        )
        if end >= len(ctx_ids):
            return windows
        start += doc_stride


def answer_span(
    context: str, texts: Sequence[str], starts: Sequence[int]
) -> tuple[int, int] | None:
    """The first gold answer as a character span of `context`: at its recorded start if the text
    is there, else where the text first occurs; None if it does not occur (such a record still
    trains, its windows pointing at [CLS])."""
    for text, start in zip(texts, starts):
        if text and context[start : start + len(text)] == text:
            return start, start + len(text)
    for text in texts:
        at = context.find(text) if text else -1
        if at >= 0:
            return at, at + len(text)
    return None


# ---------------------------------------------------------------------------------------------
# Datasets


def read_options(cfg: Config) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=max(1, cfg.data.prefetch_threads), prefetch_buffer_size=64)


class _Windows(gx.FlatMapTransform):
    """A record's list of rows -> the rows (QA windows)."""

    max_fan_out = 256

    def flat_map(self, element: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        if len(element) > self.max_fan_out:
            log.warning("a record made %d windows; keeping %d", len(element), self.max_fan_out)
        return element[: self.max_fan_out]


def train_batches(
    cfg: Config,
    split: str,
    featurize: Callable[[int, dict[str, Any]], Any],
    keys: Sequence[str],
    *,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    fan_out: bool = False,
) -> grain.IterDataset:
    """Shuffled, repeating batches of `split`: records -> featurize -> (windows ->) batch.

    featurize(index, record) returns one row (a dict) or, with fan_out, a list of rows whose
    order is then mixed by a window shuffle. Batches hold `keys` only, [batch_size, ...] each.
    """
    ds = pipeline.documents(
        cfg.data, split, seed=seed, process_index=process_index, process_count=process_count
    )
    ds = ds.map_with_index(featurize)
    it = ds.to_iter_dataset(read_options(cfg))
    if fan_out:
        it = gx.FlatMapIterDataset(it, _Windows())
        if cfg.data.shuffle_buffer > 1:
            salt = int.from_bytes(hashlib.sha256(f"{seed}/windows/{split}".encode()).digest()[:4])
            it = gx.WindowShuffleIterDataset(it, window_size=cfg.data.shuffle_buffer, seed=salt)
    it = it.map(lambda row: {k: row[k] for k in keys})
    return it.batch(batch_size, drop_remainder=True)


def eval_records(
    cfg: Config,
    split: str,
    featurize: Callable[[int, dict[str, Any]], Any],
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Any]:
    """featurize(index, record) over this process's share of `split`, once, in order (index is
    the record's index in the split)."""
    source = sources.data_source(
        cfg.data.dataset, split, cfg.data.data_dir, download=cfg.data.download
    )
    # Slicing after map_with_index keeps the index of the record in the whole split.
    ds = grain.MapDataset.source(source).map_with_index(featurize)
    if process_count > 1:
        ds = ds[process_index::process_count]
    yield from ds.to_iter_dataset(read_options(cfg))
