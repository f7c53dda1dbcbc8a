"""Static word vectors: read and write GloVe / word2vec files, initialise an `Embed` from them,
and query them (nearest neighbours, analogies, word-similarity and analogy benchmarks).

File formats (the ones the original tools and gensim write):
- word2vec text: a header line "<count> <dim>", then one "<word> <v1> ... <vdim>" line per word.
- GloVe text: the same lines without the header (the dimension is read off the first line).
- word2vec binary: the header line, then per word "<word> " followed by dim little-endian
  float32 values (and, as the original tool writes it, a newline).
In a GloVe file a word may contain spaces (the 840B vectors have some): a line's last dim fields
are the numbers and the rest is the word. A word2vec text line has exactly dim + 1 fields.

Benchmarks, in their standard formats:
- word similarity (WordSim-353, SimLex-999, MEN, ...): one "word1 word2 score" line per pair,
  separated by tabs, commas or spaces; '#' lines are comments; a first line whose score is not a
  number is a header. `score_column` picks the score (SimLex-999's is column 3, 0-based).
- analogies (Google's questions-words.txt, BATS in the same layout): ": section" lines, then
  "a b c d" lines meaning a : b :: c : d.

Command line (lmflax.cli.vectors):
  lmflax vectors export --workdir=runs/word2vec --out=vectors.txt [--binary]
  lmflax vectors neighbors FILE_OR_WORKDIR WORD [WORD ...]
  lmflax vectors evaluate FILE_OR_WORKDIR [--similarity=F ...] [--analogies=F ...]
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmflax.nn import Embed, unbox

log = logging.getLogger(__name__)


class VectorFileError(ValueError):
    """A vector, similarity or analogy file that cannot be read; names the file and line."""


@dataclasses.dataclass
class WordVectors:
    """words [n] and their vectors [n, D] float32 (row i is words[i]); first occurrence wins in
    lookups when a word repeats."""

    words: list[str]
    vectors: np.ndarray

    def __post_init__(self) -> None:
        self.words = list(self.words)
        self.vectors = np.asarray(self.vectors, np.float32)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words):
            raise ValueError(
                f"{len(self.words)} words need vectors of shape [{len(self.words)}, D]; got "
                f"{self.vectors.shape}"
            )
        self.index: dict[str, int] = {}
        for i, w in enumerate(self.words):
            self.index.setdefault(w, i)
        self._unit: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[self._id(word)]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def unit(self) -> np.ndarray:
        """The vectors scaled to length 1 (zero vectors stay zero), [n, D]."""
        if self._unit is None:
            norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._unit = self.vectors / np.maximum(norms, 1e-12)
        return self._unit

    def _id(self, word: str) -> int:
        try:
            return self.index[word]
        except KeyError:
            raise KeyError(f"word {word!r} is not among the {len(self)} words") from None

    def lookup(self, word: str, case_insensitive: bool = False) -> int | None:
        """The row of `word` (or of its lowercase form when case_insensitive), or None."""
        if word in self.index:
            return self.index[word]
        if case_insensitive:
            return self._lower_index().get(word.lower())
        return None

    def _lower_index(self) -> dict[str, int]:
        if not hasattr(self, "_lower"):
            self._lower: dict[str, int] = {}
            for i, w in enumerate(self.words):
                self._lower.setdefault(w.lower(), i)
        return self._lower


# ---------------------------------------------------------------------------------------------
# Reading and writing


def read_vectors(
    path: str | Path, *, binary: bool | None = None, limit: int | None = None
) -> WordVectors:
    """Reads a word2vec (text or binary) or GloVe (text) file. binary=None: binary iff the name
    ends in '.bin'. limit: read only the first `limit` vectors. Raises VectorFileError naming
    the line (text) or entry (binary) that is malformed."""
    path = Path(path)
    if binary is None:
        binary = path.suffix == ".bin"
    if not path.is_file():
        raise VectorFileError(f"vector file {path} does not exist")
    return _read_binary(path, limit) if binary else _read_text(path, limit)


def _header(fields: list[str]) -> tuple[int, int] | None:
    if len(fields) == 2 and all(f.isdigit() for f in fields):
        return int(fields[0]), int(fields[1])
    return None


def _read_text(path: Path, limit: int | None) -> WordVectors:
    words: list[str] = []
    rows: list[np.ndarray] = []
    dim = expected = None
    duplicates = 0
    seen: set[str] = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(words) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise VectorFileError(
                    f"{path}, line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})"
                ) from None
            line = line.rstrip("\r\n").rstrip(" ")
            if not line.strip():
                continue
            fields = line.split(" ")
            if lineno == 1 and _header(fields):
                expected, dim = _header(fields)
                continue
            if dim is None:
                dim = len(fields) - 1
                if dim < 1:
                    raise VectorFileError(
                        f"{path}, line {lineno}: expected '<word> <numbers...>' or a "
                        f"'<count> <dim>' header, got {line[:80]!r}"
                    )
            # GloVe files (no header) have words with spaces; word2vec's have none.
            wrong = len(fields) != dim + 1 if expected is not None else len(fields) < dim + 1
            if wrong or not " ".join(fields[:-dim]):
                raise VectorFileError(
                    f"{path}, line {lineno}: expected a word and {dim} numbers, got "
                    f"{len(fields) - 1} fields after the first: {line[:80]!r}"
                )
            word = " ".join(fields[:-dim])
            try:
                row = np.array(fields[-dim:], dtype=np.float32)
            except ValueError:
                bad = next(x for x in fields[-dim:] if not _is_number(x))
                raise VectorFileError(
                    f"{path}, line {lineno}: {bad!r} is not a number (word {word!r})"
                ) from None
            if word in seen:
                duplicates += 1
            seen.add(word)
            words.append(word)
            rows.append(row)
    if dim is None:
        raise VectorFileError(f"{path} holds no vectors")
    if expected is not None and limit is None and len(words) != expected:
        raise VectorFileError(
            f"{path}: the header announces {expected} vectors but the file holds {len(words)}"
        )
    if duplicates:
        log.warning("%s: %d words appear more than once; lookups use the first", path, duplicates)
    return WordVectors(words, np.stack(rows) if rows else np.zeros((0, dim), np.float32))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_binary(path: Path, limit: int | None) -> WordVectors:
    data = path.read_bytes()
    end = data.find(b"\n")
    head = _header(data[:end].decode("ascii", "replace").split()) if end > 0 else None
    if head is None:
        raise VectorFileError(
            f"{path}, line 1: a binary word2vec file starts with '<count> <dim>', got "
            f"{data[: max(end, 0)][:40]!r}"
        )
    count, dim = head
    n = count if limit is None else min(count, limit)
    words: list[str] = []
    table = np.empty((n, dim), np.float32)
    pos = end + 1
    for i in range(n):
        while pos < len(data) and data[pos : pos + 1] in (b"\n", b"\r"):
            pos += 1
        space = data.find(b" ", pos)
        if space < 0 or space - pos > 10_000:
            raise VectorFileError(
                f"{path}, entry {i + 1} of {count} (byte {pos}): no '<word> ' where a word "
                "should start (file truncated or not a binary word2vec file)"
            )
        try:
            words.append(data[pos:space].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise VectorFileError(
                f"{path}, entry {i + 1} (byte {pos}): word is not valid UTF-8 ({e.reason})"
            ) from None
        start, stop = space + 1, space + 1 + 4 * dim
        if stop > len(data):
            raise VectorFileError(
                f"{path}, entry {i + 1} of {count} ({words[-1]!r}, byte {start}): expected "
                f"{4 * dim} bytes of float32 vector, the file ends after {len(data) - start}"
            )
        table[i] = np.frombuffer(data, "<f4", dim, start)
        pos = stop
    return WordVectors(words, table)


def _check_words(words: Sequence[str], spaces: bool) -> None:
    banned = "\n\r\t" if spaces else "\n\r\t "
    for i, w in enumerate(words):
        if not w or any(ch in w for ch in banned) or w != w.strip(" "):
            raise ValueError(
                f"word {i} ({w!r}) cannot be written: words must be non-empty, without tabs or "
                "line breaks, and not start or end with a space"
                + ("" if spaces else "; only the GloVe format (header=False) allows inner spaces")
            )


def write_vectors(
    path: str | Path, vectors: WordVectors, *, binary: bool = False, header: bool = True
) -> Path:
    """Writes word2vec text (header=True), GloVe text (header=False) or word2vec binary.

    Text values are written with 9 significant digits, which read back as the same float32.
    """
    path = Path(path)
    _check_words(vectors.words, spaces=not binary and not header)
    table = np.asarray(vectors.vectors, np.float32)
    n, dim = table.shape
    if binary:
        with open(path, "wb") as f:
            f.write(f"{n} {dim}\n".encode())
            for word, row in zip(vectors.words, table):
                f.write(word.encode("utf-8") + b" " + row.astype("<f4").tobytes() + b"\n")
        return path
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        if header:
            f.write(f"{n} {dim}\n")
        for word, row in zip(vectors.words, table.tolist()):
            f.write(word + " " + " ".join(f"{x:.9g}" for x in row) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Embed


def table_initializer(table: np.ndarray) -> Any:
    """A Flax initializer that returns `table` (checking the requested shape), for
    `Embed(..., embedding_init=table_initializer(table))`."""
    table = np.asarray(table)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        del key
        if tuple(shape) != table.shape:
            raise ValueError(f"pretrained table has shape {table.shape}, the layer wants {shape}")
        return jnp.asarray(table, dtype)

    return init


@dataclasses.dataclass
class PretrainedEmbedding:
    """`embed.apply(variables, ids)` looks up `words[ids]`; found/missing count the words."""

    words: list[str]
    embed: Embed
    variables: dict[str, Any]
    found: int
    missing: list[str]

    @property
    def table(self) -> np.ndarray:
        return np.asarray(self.variables["params"]["embedding"])


def pretrained_embed(
    vectors: WordVectors,
    vocabulary: Sequence[str] | None = None,
    *,
    missing_init: str = "normal",
    case_insensitive: bool = True,
    seed: int = 0,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> PretrainedEmbedding:
    """An `Embed` whose table row i is the vector of vocabulary[i].

    vocabulary: the words, in id order (e.g. a tokenizer's); None = the file's own words, in the
    file's order. A word absent from the file (after trying its lowercase form when
    case_insensitive) is counted in a warning and gets, with missing_init='normal', a vector
    drawn from N(0, σ²) with σ the standard deviation of all the file's values (so it has the
    pretrained vectors' scale; seeded by `seed`), or with missing_init='zeros' a zero vector.
    """
    if missing_init not in ("normal", "zeros"):
        raise ValueError(f"missing_init is {missing_init!r}; accepted: 'normal', 'zeros'")
    words = list(vectors.words if vocabulary is None else vocabulary)
    if not words:
        raise ValueError("the vocabulary is empty")
    rows = [vectors.lookup(w, case_insensitive) for w in words]
    missing = [w for w, r in zip(words, rows) if r is None]
    table = np.zeros((len(words), vectors.dim), np.float32)
    found_ids = np.array([i for i, r in enumerate(rows) if r is not None], np.int64)
    if len(found_ids):
        table[found_ids] = vectors.vectors[[r for r in rows if r is not None]]
    if missing:
        sigma = float(vectors.vectors.std()) if vectors.vectors.size else 0.0
        if missing_init == "normal":
            rng = np.random.default_rng(seed)
            miss_ids = [i for i, r in enumerate(rows) if r is None]
            table[miss_ids] = rng.normal(0.0, sigma, (len(miss_ids), vectors.dim))
        log.warning(
            "%d of %d vocabulary words are not in the pretrained vectors; they start from %s "
            "(e.g. %s)",
            len(missing),
            len(words),
            f"N(0, {sigma:.3g}²)" if missing_init == "normal" else "zeros",
            ", ".join(repr(w) for w in missing[:5]),
        )
    embed = Embed(
        len(words),
        vectors.dim,
        embedding_init=table_initializer(table),
        dtype=dtype,
        param_dtype=param_dtype,
    )
    variables = {"params": {"embedding": jnp.asarray(table, param_dtype)}}
    return PretrainedEmbedding(words, embed, variables, len(words) - len(missing), missing)


def embed_table(variables: Any) -> np.ndarray:
    """The [V, D] table of an Embed's variables ({'params': {'embedding': ...}}, the params
    alone, or the array), unboxed from logical-partitioning metadata."""
    node = unbox(variables)
    for key in ("params", "embedding"):
        if isinstance(node, dict) and key in node:
            node = node[key]
    table = np.asarray(jax.device_get(node), np.float32)
    if table.ndim != 2:
        raise ValueError(f"expected an Embed's [V, D] table, got shape {table.shape}")
    return table


def export_embed(
    path: str | Path,
    words: Sequence[str],
    variables: Any,
    *,
    binary: bool = False,
    header: bool = True,
) -> Path:
    """Writes the first len(words) rows of an Embed's table as a vector file (text by default)."""
    table = embed_table(variables)
    if table.shape[0] < len(words):
        raise ValueError(f"{len(words)} words but the table has only {table.shape[0]} rows")
    return write_vectors(
        path, WordVectors(list(words), table[: len(words)]), binary=binary, header=header
    )


# ---------------------------------------------------------------------------------------------
# Queries


def nearest(
    vectors: WordVectors,
    query: str | np.ndarray,
    k: int = 10,
    *,
    exclude: Iterable[str] = (),
) -> list[tuple[str, float]]:
    """The k words with the highest cosine similarity to `query` (a word, excluded from its own
    answer, or a vector), best first, as (word, cosine)."""
    banned = set(exclude)
    if isinstance(query, str):
        banned.add(query)
        q = vectors.unit[vectors._id(query)]
    else:
        q = np.asarray(query, np.float32)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
    scores = vectors.unit @ q
    for w in banned:
        if w in vectors.index:
            scores[vectors.index[w]] = -np.inf
    k = min(k, int(np.isfinite(scores).sum()))
    top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, np.int64)
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(vectors.words[i], float(scores[i])) for i in top]


def analogy(vectors: WordVectors, a: str, b: str, c: str, k: int = 1) -> list[tuple[str, float]]:
    """a : b :: c : ?  — the words nearest (cosine) to unit(b) - unit(a) + unit(c), never a, b
    or c themselves (3CosAdd, as in word2vec's compute-accuracy and gensim)."""
    u = vectors.unit
    target = u[vectors._id(b)] - u[vectors._id(a)] + u[vectors._id(c)]
    return nearest(vectors, target, k, exclude=(a, b, c))


@dataclasses.dataclass
class SimilarityResult:
    spearman: float  # rank correlation of cosine similarity with the human scores
    pairs: int  # pairs whose two words both have vectors (the correlation uses these)
    oov: int  # pairs skipped because a word has no vector


def _split(line: str) -> list[str]:
    if "\t" in line:
        return [f.strip() for f in line.split("\t")]
    if "," in line:
        return [f.strip() for f in line.split(",")]
    return line.split()


def read_similarity_pairs(
    path: str | Path, *, score_column: int = 2
) -> list[tuple[str, str, float]]:
    """(word1, word2, score) from a word-similarity file (see the module docstring)."""
    pairs = []
    first = True
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = _split(line)
            if len(fields) <= max(score_column, 1):
                raise VectorFileError(
                    f"{path}, line {lineno}: expected 'word1 word2 score' (score in column "
                    f"{score_column}), got {line[:80]!r}"
                )
            try:
                score = float(fields[score_column])
            except ValueError:
                if first:  # a header line
                    first = False
                    continue
                raise VectorFileError(
                    f"{path}, line {lineno}: score {fields[score_column]!r} is not a number"
                ) from None
            first = False
            pairs.append((fields[0], fields[1], score))
    if not pairs:
        raise VectorFileError(f"{path} holds no word pairs")
    return pairs


def evaluate_similarity(
    vectors: WordVectors,
    path: str | Path,
    *,
    score_column: int = 2,
    case_insensitive: bool = True,
) -> SimilarityResult:
    """Spearman correlation between cosine similarity and the file's human scores, over the
    pairs whose words both have vectors."""
    from scipy.stats import spearmanr  # deferred: scipy.stats takes ~1 s to import

    model, human, oov = [], [], 0
    u = vectors.unit
    for w1, w2, score in read_similarity_pairs(path, score_column=score_column):
        i, j = vectors.lookup(w1, case_insensitive), vectors.lookup(w2, case_insensitive)
        if i is None or j is None:
            oov += 1
            continue
        model.append(float(u[i] @ u[j]))
        human.append(score)
    if len(model) < 2:
        raise ValueError(f"{path}: only {len(model)} pairs have vectors; cannot correlate")
    rho = float(spearmanr(model, human).statistic)
    return SimilarityResult(spearman=rho, pairs=len(model), oov=oov)


@dataclasses.dataclass
class AnalogyResult:
    accuracy: float  # correct / total (questions with a word without a vector are skipped)
    correct: int
    total: int
    oov: int
    sections: dict[str, tuple[int, int]]  # section -> (correct, total)


def read_analogies(path: str | Path) -> list[tuple[str, tuple[str, str, str, str]]]:
    """(section, (a, b, c, d)) for every question of an analogy file."""
    out = []
    section = ""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(":"):
                section = line[1:].strip()
                continue
            fields = line.split()
            if len(fields) != 4:
                raise VectorFileError(
                    f"{path}, line {lineno}: an analogy is four words 'a b c d', got "
                    f"{len(fields)}: {line[:80]!r}"
                )
            out.append((section, (fields[0], fields[1], fields[2], fields[3])))
    if not out:
        raise VectorFileError(f"{path} holds no analogy questions")
    return out


def evaluate_analogies(
    vectors: WordVectors,
    path: str | Path,
    *,
    case_insensitive: bool = True,
    restrict_vocab: int | None = None,
    batch: int = 512,
) -> AnalogyResult:
    """Accuracy of `analogy(a, b, c) == d` over the file's questions (3CosAdd, excluding the
    question words), answers searched among the first restrict_vocab words (all if None)."""
    limit = len(vectors) if restrict_vocab is None else min(restrict_vocab, len(vectors))
    u = vectors.unit[:limit]
    ids, names, oov = [], [], 0
    for section, words in read_analogies(path):
        rows = [vectors.lookup(w, case_insensitive) for w in words]
        if any(r is None or r >= limit for r in rows):
            oov += 1
            continue
        ids.append(rows)
        names.append(section)
    q = np.asarray(ids, np.int64).reshape(-1, 4)
    hits = np.zeros(len(q), bool)
    for s in range(0, len(q), batch):
        a, b, c, d = q[s : s + batch].T
        scores = (u[b] - u[a] + u[c]) @ u.T
        r = np.arange(len(a))
        scores[r, a] = scores[r, b] = scores[r, c] = -np.inf
        hits[s : s + batch] = scores.argmax(axis=1) == d
    sections: dict[str, tuple[int, int]] = {}
    for name, hit in zip(names, hits.tolist()):
        c, t = sections.get(name, (0, 0))
        sections[name] = (c + int(hit), t + 1)
    total = len(q)
    correct = int(hits.sum())
    return AnalogyResult(
        accuracy=correct / total if total else float("nan"),
        correct=correct,
        total=total,
        oov=oov,
        sections=sections,
    )
