"""word2vec data: a word vocabulary with a minimum count, frequent-word subsampling, context
windows and unigram^0.75 negatives, as a resumable grain pipeline over the same TFDS sources.

Words are the maximal runs of letters, digits and underscores (the regex `\\w+`), lowercased by
default. Words below `min_count` are dropped from the text before windows are taken, as in the
original word2vec.

Pipeline: documents (shuffled each epoch, this process's share; `pipeline.documents`) -> word ids
-> subsample and pair up (seeded by the document's index) -> drop documents that gave no example
-> rebatch the per-document example arrays into rows of batch_size -> draw negatives (seeded).
Every stage is deterministic given the seed, so the iterator's `get_state()`/`set_state()`
resume at exactly the next batch.

A batch is a dict of arrays with a leading batch axis B:
  inputs [B, C] int32      the input word(s): skip-gram C = 1 (a context word); CBOW C = 2·window
  input_mask [B, C] f32    1 for a real input word (CBOW windows are shorter at the edges)
  targets [B] int32        the word to predict: the window's centre
  negatives [B, K] int32   K noise words drawn from unigram^ns_exponent
  weights [B] f32          1 for every real example
  words [B] f32            corpus words read: a document's raw word count on its first example
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grain
import grain.experimental as gx
import numpy as np

from lmflax.config import Config, DataConfig
from lmflax.data import files, pipeline, sources
from lmflax.data.sources import DataError

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")


def split_words(text: str, lowercase: bool = True) -> list[str]:
    """The words of `text`: maximal runs of \\w characters, lowercased if asked."""
    if lowercase:
        text = text.lower()
    return _WORD.findall(text)


class Vocabulary:
    """Words sorted by count (descending, ties by the word), with their corpus counts.

    Ids are positions in `words`: 0 is the most frequent word. There is no unknown-word id:
    words outside the vocabulary are dropped from the text, as in word2vec.
    """

    def __init__(self, words: Iterable[str], counts: Iterable[int], *, lowercase: bool = True):
        self.words: tuple[str, ...] = tuple(words)
        self.counts = np.asarray(list(counts), np.int64)
        self.lowercase = lowercase
        if len(self.words) != len(self.counts):
            raise ValueError(f"{len(self.words)} words but {len(self.counts)} counts")
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary words must be unique")

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    @classmethod
    def from_counts(
        cls, counts: Counter[str], *, min_count: int, max_size: int, lowercase: bool = True
    ) -> Vocabulary:
        """The `max_size` most frequent words counted at least `min_count` times."""
        kept = sorted(
            ((w, c) for w, c in counts.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0])
        )[:max_size]
        return cls([w for w, _ in kept], [c for _, c in kept], lowercase=lowercase)

    def encode(self, text: str) -> tuple[np.ndarray, int]:
        """(ids of the in-vocabulary words [n] int32, the number of words in the text)."""
        words = split_words(text, self.lowercase)
        get = self.index.get
        ids = [i for i in map(get, words) if i is not None]
        return np.asarray(ids, np.int32), len(words)

    def keep_probabilities(self, sample: float) -> np.ndarray:
        """word2vec's subsampling: a word of frequency f = count/total is kept with probability
        (sqrt(f / sample) + 1) · sample / f (capped at 1). sample = 0 keeps everything. [V] f64.
        """
        if sample <= 0:
            return np.ones(len(self), np.float64)
        f = self.counts / max(int(self.counts.sum()), 1)
        return np.minimum((np.sqrt(f / sample) + 1.0) * sample / f, 1.0)

    def noise_cdf(self, exponent: float) -> np.ndarray:
        """Cumulative noise distribution count^exponent / Σ count^exponent, [V] f64."""
        p = self.counts.astype(np.float64) ** exponent
        cdf = np.cumsum(p / p.sum())
        cdf[-1] = 1.0
        return cdf

    def save(self, path: str | Path) -> None:
        """One 'word<TAB>count' line per word, most frequent first."""
        lines = [f"{w}\t{c}\n" for w, c in zip(self.words, self.counts.tolist())]
        Path(path).write_text("".join(lines), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, *, lowercase: bool = True) -> Vocabulary:
        words, counts = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                word, sep, count = line.rstrip("\n").rpartition("\t")
                if not sep or not count.isdigit():
                    raise DataError(f"{path}:{n}: expected 'word<TAB>count', got {line!r}")
                words.append(word)
                counts.append(int(count))
        return cls(words, counts, lowercase=lowercase)


def count_words(texts: Iterable[str], lowercase: bool = True) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(split_words(text, lowercase))
    return counts


def load_vocabulary(
    data: DataConfig, *, min_count: int, max_size: int, lowercase: bool = True
) -> Vocabulary:
    """The word vocabulary of the training split: counted over its first
    `data.tokenizer_train_docs` records (all of them if 0) and cached under
    data_dir/lmflax_vocabs as word counts, then cut to min_count / max_size."""
    data_dir = data.data_dir or sources.default_data_dir()
    dataset = files.cache_name(data.dataset, data.data_dir)
    name = re.sub(r"[^\w.-]", "_", f"{dataset}-{data.train_split}-{data.text_key}")
    docs = data.tokenizer_train_docs
    path = (
        Path(data_dir)
        / "lmflax_vocabs"
        / f"{name}-{docs or 'all'}-{'lower' if lowercase else 'cased'}.tsv"
    )

    def write(tmp: Path) -> None:
        source = sources.data_source(
            data.dataset, data.train_split, data_dir, download=data.download
        )
        limit = docs or len(source)
        log.info("counting words in %d records -> %s", min(limit, len(source)), path)
        counts = count_words(pipeline.texts(source, data.text_key, limit), lowercase)
        full = Vocabulary.from_counts(
            counts, min_count=1, max_size=len(counts), lowercase=lowercase
        )
        full.save(tmp)

    full = Vocabulary.load(sources.build_once(path, write), lowercase=lowercase)
    keep = int(np.sum(full.counts >= min_count))
    vocab = Vocabulary(
        full.words[: min(keep, max_size)],
        full.counts[: min(keep, max_size)],
        lowercase=lowercase,
    )
    if vocab.vocab_size == 0:
        raise DataError(
            f"no word of {data.dataset!r} split {data.train_split!r} occurs min_count="
            f"{min_count} times (the most frequent occurs {int(full.counts.max(initial=0))} times)"
        )
    return vocab


# ---------------------------------------------------------------------------------------------
# Examples


def make_examples(
    ids: np.ndarray,
    words: int,
    rng: np.random.Generator,
    *,
    keep_prob: np.ndarray,
    window: int,
    cbow: bool,
) -> dict[str, np.ndarray]:
    """One document's training examples (see the module docstring for the keys; no negatives).

    Subsampling drops word i with probability 1 - keep_prob[id]; then every remaining centre
    word draws a reduced window b ~ U{1..window} and pairs with the words within b of it.
    """
    if keep_prob is not None and len(ids):
        ids = ids[rng.random(len(ids)) < keep_prob[ids]]
    n = len(ids)
    b = rng.integers(1, window + 1, size=n)
    offsets = np.concatenate([np.arange(-window, 0), np.arange(1, window + 1)])  # [2W]
    ctx = np.arange(n)[:, None] + offsets[None, :]  # [n, 2W] positions around each centre
    mask = (np.abs(offsets)[None, :] <= b[:, None]) & (ctx >= 0) & (ctx < n)
    ctx_ids = ids[np.clip(ctx, 0, max(n - 1, 0))] if n else np.zeros((0, 2 * window), np.int32)
    if cbow:
        has = mask.any(axis=1)
        inputs = np.where(mask, ctx_ids, 0)[has]
        input_mask = mask[has].astype(np.float32)
        targets = ids[has]
    else:
        # One pair per allowed (centre, context), in document order as word2vec visits them.
        rows, cols = np.nonzero(mask)
        inputs = ctx_ids[rows, cols][:, None]
        input_mask = np.ones(inputs.shape, np.float32)
        targets = ids[rows]
    m, C = len(targets), (2 * window if cbow else 1)
    words_col = np.zeros(m, np.float32)
    if m:
        words_col[0] = words
    return {
        "inputs": inputs.astype(np.int32).reshape(m, C),
        "input_mask": input_mask.reshape(m, C),
        "targets": targets.astype(np.int32),
        "weights": np.ones(m, np.float32),
        "words": words_col,
    }


def draw_negatives(
    targets: np.ndarray, rng: np.random.Generator, *, cdf: np.ndarray, negatives: int
) -> np.ndarray:
    """[B, K] int32 noise words drawn from the distribution whose cumulative table is cdf."""
    u = rng.random((len(targets), negatives))
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int32)


def word2vec_dataset(
    cfg: Config,
    vocab: Vocabulary,
    split: str,
    *,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Per-process batches of word2vec examples from `split`, repeating forever."""
    m, data = cfg.model, cfg.data
    cbow = m.architecture == "cbow"
    keep_prob = vocab.keep_probabilities(m.sample) if m.sample > 0 else None
    cdf = vocab.noise_cdf(m.ns_exponent)
    docs = pipeline.documents(
        data, split, seed=seed, process_index=process_index, process_count=process_count
    )

    def encode(index: int, record: dict[str, Any]) -> tuple[np.ndarray, int]:
        return vocab.encode(pipeline.text_of(record, data.text_key, index))

    def examples(doc: tuple[np.ndarray, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        ids, words = doc
        return make_examples(ids, words, rng, keep_prob=keep_prob, window=m.window, cbow=cbow)

    docs = docs.map_with_index(encode).random_map(
        examples, seed=pipeline.derive_seed(seed, "word2vec", "windows", split)
    )
    it = docs.to_iter_dataset(pipeline.read_options(data))
    # Rebatching cannot take an empty piece; a document with no pair contributes nothing anyway.
    it = it.filter(lambda ex: len(ex["targets"]) > 0)
    it = gx.RebatchIterDataset(it, batch_size, drop_remainder=True)

    def add_negatives(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        batch = dict(batch)
        batch["negatives"] = draw_negatives(batch["targets"], rng, cdf=cdf, negatives=m.negatives)
        return batch

    return it.random_map(
        add_negatives, seed=pipeline.derive_seed(seed, "word2vec", "negatives", split)
    )
