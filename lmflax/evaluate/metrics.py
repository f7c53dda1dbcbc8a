"""Evaluation metrics as counts that add up exactly.

Every metric here is a function of sums: a confusion matrix for accuracy and precision/recall/F1,
(true positives, predicted, gold) entity counts for BIO tagging, per-example score sums for
SQuAD, (negative log-likelihood sum, token count) for perplexity. Sums of batches and of hosts
are the sums of the whole split, so the final numbers are exact, never averages of averages.

Two kinds of functions:
- counting (`confusion_matrix`, `entity_counts`, `squad_counts`): the per-batch part. The
  confusion matrix is jnp and runs on device inside a jitted step; entity and answer counts
  need strings and run on the host.
- finishing (`precision_recall_f1`, `classification_metrics`, `entity_metrics`,
  `perplexity`): counts -> numbers, on the host, after aggregation.

A ratio whose denominator is 0 is 0.0 (scikit-learn's `zero_division=0`), e.g. precision when
nothing was predicted.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

AVERAGES = ("binary", "macro", "micro", None)


def _div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------
# Classification


def confusion_matrix(
    labels: jax.Array, predictions: jax.Array, num_classes: int, weights: jax.Array | None = None
) -> jax.Array:
    """labels, predictions [...] int (weights [...], 0 = ignore) -> counts [C, C] float32, rows
    the true class and columns the predicted one. jit-able; a sum over batches is the matrix of
    their union. Labels outside [0, C) are not counted."""
    true = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    pred = jax.nn.one_hot(predictions, num_classes, dtype=jnp.float32)
    if weights is not None:
        true = true * weights.astype(jnp.float32)[..., None]
    return jnp.einsum("...C,...K->CK", true, pred)


def accuracy(confusion: np.ndarray) -> float:
    """The fraction of counted examples on the diagonal."""
    cm = np.asarray(confusion, np.float64)
    return float(_div(np.trace(cm), cm.sum()))


def precision_recall_f1(
    confusion: np.ndarray, average: str | None = "macro", pos_label: int = 1
) -> tuple[np.ndarray | float, np.ndarray | float, np.ndarray | float]:
    """(precision, recall, F1) from a confusion matrix [C, C] (rows true, columns predicted).

    average: 'binary' (class `pos_label` only), 'micro' (from the summed tp, fp, fn of all
    classes), 'macro' (the unweighted mean over the classes that occur, as truth or as
    prediction, scikit-learn's default label set: a class absent from both does not pull the
    mean to 0), or None (per-class arrays over all C classes). F1 = 2tp / (2tp + fp + fn).
    """
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}; accepted: {AVERAGES}")
    cm = np.asarray(confusion, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got shape {cm.shape}")
    tp = np.diag(cm)
    fp = cm.sum(0) - tp  # predicted as the class, truly another
    fn = cm.sum(1) - tp
    if average == "micro":
        t, p, n = tp.sum(), fp.sum(), fn.sum()
        return float(_div(t, t + p)), float(_div(t, t + n)), float(_div(2 * t, 2 * t + p + n))
    precision, recall, f1 = _div(tp, tp + fp), _div(tp, tp + fn), _div(2 * tp, 2 * tp + fp + fn)
    if average is None:
        return precision, recall, f1
    if average == "binary":
        if not 0 <= pos_label < cm.shape[0]:
            raise ValueError(
                f"pos_label {pos_label} is not a class of a {cm.shape[0]}-class matrix"
            )
        return float(precision[pos_label]), float(recall[pos_label]), float(f1[pos_label])
    present = (cm.sum(0) + cm.sum(1)) > 0
    if not present.any():
        return 0.0, 0.0, 0.0
    return (
        float(precision[present].mean()),
        float(recall[present].mean()),
        float(f1[present].mean()),
    )


def classification_metrics(confusion: np.ndarray, pos_label: int | None = None) -> dict[str, float]:
    """accuracy, macro_/micro_ precision, recall and F1, plus binary precision/recall/f1 of
    `pos_label` (default 1 for two classes, none otherwise)."""
    cm = np.asarray(confusion, np.float64)
    out = {"accuracy": accuracy(cm)}
    if pos_label is None and cm.shape[0] == 2:
        pos_label = 1
    if pos_label is not None:
        p, r, f = precision_recall_f1(cm, "binary", pos_label)
        out.update(precision=p, recall=r, f1=f)
    for avg in ("macro", "micro"):
        p, r, f = precision_recall_f1(cm, avg)
        out.update({f"{avg}_precision": p, f"{avg}_recall": r, f"{avg}_f1": f})
    return out


# ---------------------------------------------------------------------------------------------
# Entities in BIO tags


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one BIO-tagged sentence as (type, start, end) word spans, end exclusive.

    Chunks follow conlleval: a chunk starts at B-X, or at I-X that does not continue a chunk of
    type X (after O or another type; IOB1 data has these); it ends before the next tag that is
    not I-X.
    """
    entities = set()
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        if tag == "O":
            prefix, typ = "O", None
        elif len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
            prefix, typ = tag[0], tag[2:]
        else:
            raise ValueError(f"tag {tag!r} at position {i} is not BIO (O, B-TYPE or I-TYPE)")
        if start is not None and (prefix != "I" or typ != kind):
            entities.add((kind, start, i))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, typ
    return entities


def entity_counts(gold: Iterable[Sequence[str]], predicted: Iterable[Sequence[str]]) -> np.ndarray:
    """[correct, predicted, gold] entity counts over sentences (tag sequences of equal lengths).
    An entity is correct only if its type and both boundaries match a gold entity."""
    counts = np.zeros(3, np.int64)
    for i, (g, p) in enumerate(zip(gold, predicted, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        ge, pe = bio_entities(g), bio_entities(p)
        counts += (len(ge & pe), len(pe), len(ge))
    return counts


def entity_metrics(counts: np.ndarray) -> dict[str, float]:
    """[correct, predicted, gold] -> entity precision, recall and F1 = 2c / (predicted + gold)."""
    c, p, g = (float(x) for x in counts)
    return {
        "entity_precision": float(_div(c, p)),
        "entity_recall": float(_div(c, g)),
        "entity_f1": float(_div(2 * c, p + g)),
    }


# ---------------------------------------------------------------------------------------------
# SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, drop punctuation, drop the articles a/an/
    the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    if not answers:
        raise ValueError("exact_match needs at least one gold answer")
    pred = normalize_answer(prediction)
    return float(max(pred == normalize_answer(a) for a in answers))


def _token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        # An empty answer matches only an empty answer (the SQuAD 2.0 script's rule; 1.1's
        # would score empty against empty 0).
        return float(pred == gold)
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best bag-of-tokens F1 of the normalised prediction against any gold answer."""
    if not answers:
        raise ValueError("token_f1 needs at least one gold answer")
    return max(_token_f1(prediction, a) for a in answers)


def squad_counts(predictions: Iterable[str], answers: Iterable[Sequence[str]]) -> np.ndarray:
    """[exact-match sum, F1 sum, examples] over (prediction, gold answers) pairs."""
    counts = np.zeros(3, np.float64)
    for pred, gold in zip(predictions, answers, strict=True):
        counts += (exact_match(pred, gold), token_f1(pred, gold), 1.0)
    return counts


def squad_metrics(counts: np.ndarray) -> dict[str, float]:
    """[EM sum, F1 sum, examples] -> exact_match and f1 as fractions (the official script
    prints them ×100)."""
    em, f1, n = (float(x) for x in counts)
    return {"exact_match": float(_div(em, n)), "f1": float(_div(f1, n))}


# ---------------------------------------------------------------------------------------------
# Language models


def perplexity(nll_sum: float, count: float) -> float:
    """exp(Σ nll / Σ tokens): the exponentiated mean token loss of the whole split (NaN for no
    tokens; capped at exp(80) so a diverged model prints a number)."""
    if count <= 0:
        return float("nan")
    return math.exp(min(float(nll_sum) / float(count), 80.0))
