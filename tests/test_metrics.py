"""lmflax.evaluate.metrics against hand-computed values (edge cases included) and scikit-learn,
and the exactness of aggregating counts over batches and processes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from lmflax.evaluate import metrics as em
from lmflax.tasks.qa import best_spans

_confusion = jax.jit(em.confusion_matrix, static_argnums=2)
_best_spans = jax.jit(best_spans, static_argnums=3)


def _cm(labels, preds, c, weights=None):
    w = None if weights is None else jnp.asarray(weights)
    return np.asarray(_confusion(jnp.asarray(labels), jnp.asarray(preds), c, w))


def test_confusion_matrix_and_prf_by_hand():
    # true 0 -> predicted 0, 1; true 1 -> 1, 1, 0; true 2 -> 1
    cm = _cm([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 1], 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [1, 2, 0], [0, 1, 0]])
    assert em.accuracy(cm) == 0.5
    # class 0: tp 1 fp 1 fn 1; class 1: tp 2 fp 2 fn 1; class 2: tp 0 fp 0 fn 1
    p, r, f = em.precision_recall_f1(cm, None)
    np.testing.assert_allclose(p, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(r, [0.5, 2 / 3, 0.0])
    np.testing.assert_allclose(f, [0.5, 4 / 7, 0.0])
    p, r, f = em.precision_recall_f1(cm, "macro")
    assert (p, r) == pytest.approx((1 / 3, 7 / 18)) and f == pytest.approx(5 / 14)
    assert em.precision_recall_f1(cm, "micro") == pytest.approx((0.5, 0.5, 0.5))


def test_binary_prf_by_hand():
    cm = _cm([1, 0, 1, 1, 0], [1, 1, 0, 1, 0], 2)  # tp 2, fp 1, fn 1
    assert em.precision_recall_f1(cm, "binary") == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    out = em.classification_metrics(cm)
    assert out["accuracy"] == pytest.approx(3 / 5) and out["f1"] == pytest.approx(2 / 3)
    # class 0: tp 1, fp 1, fn 1 -> all 0.5; macro = mean(0.5, 2/3)
    assert out["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_label_absent_from_the_batch_does_not_pull_macro_down():
    with_absent = _cm([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 1], 5)  # classes 3, 4 never occur
    without = _cm([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 1], 3)
    for avg in ("macro", "micro"):
        assert em.precision_recall_f1(with_absent, avg) == pytest.approx(
            em.precision_recall_f1(without, avg)
        )
    # a class only predicted (never true) counts, with precision 0
    cm = _cm([0, 0], [0, 1], 2)
    assert em.precision_recall_f1(cm, "macro") == pytest.approx(
        ((1 + 0) / 2, (0.5 + 0) / 2, (2 / 3) / 2)
    )
    # nothing predicted for the positive class: precision 0/0 = 0
    assert em.precision_recall_f1(_cm([1, 1, 0], [0, 0, 0], 2), "binary") == (0.0, 0.0, 0.0)
    assert em.precision_recall_f1(np.zeros((3, 3)), "macro") == (0.0, 0.0, 0.0)


def test_confusion_weights_and_out_of_range_labels_are_not_counted():
    cm = np.asarray(
        em.confusion_matrix(
            jnp.asarray([0, 1, 1, 2]), jnp.asarray([0, 1, 0, 2]), 3, jnp.asarray([1, 1, 0, 0])
        )
    )
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    cm = np.asarray(em.confusion_matrix(jnp.asarray([-1, 1]), jnp.asarray([0, 1]), 2))
    assert cm.sum() == 1


def test_argmax_ties_go_to_the_lower_class():
    logits = jnp.asarray([[0.3, 0.3], [1.0, 1.0], [0.0, 1.0]])
    cm = np.asarray(em.confusion_matrix(jnp.asarray([0, 1, 1]), jnp.argmax(logits, -1), 2))
    np.testing.assert_array_equal(cm, [[1, 0], [1, 1]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    C = 5
    y = rng.integers(0, C, 300)
    # skewed predictions, some classes rare or never predicted
    yhat = np.where(rng.random(300) < 0.4, y, rng.choice(C, 300, p=[0.5, 0.3, 0.2, 0.0, 0.0]))
    cm = _cm(y, yhat, C)
    for avg in ("macro", "micro"):
        ours = em.precision_recall_f1(cm, avg)
        ref = precision_recall_fscore_support(y, yhat, average=avg, zero_division=0)[:3]
        np.testing.assert_allclose(ours, ref, rtol=1e-12)
    ours = em.precision_recall_f1(cm, None)
    ref = precision_recall_fscore_support(y, yhat, labels=range(C), average=None, zero_division=0)
    for a, b in zip(ours, ref[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    yb, yhb = y % 2, yhat % 2
    ref = precision_recall_fscore_support(yb, yhb, average="binary", zero_division=0)[:3]
    np.testing.assert_allclose(em.precision_recall_f1(_cm(yb, yhb, 2), "binary"), ref, rtol=1e-12)


def test_batch_sums_are_exact_and_averaging_batch_scores_is_not():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 100)
    yhat = np.where(rng.random(100) < 0.5, y, rng.integers(0, 3, 100))
    batches = np.split(np.arange(100), [7, 30, 31, 80])  # uneven, one of a single example
    # one compiled shape: each batch is the whole array with the other rows weighted 0
    masks = [np.isin(np.arange(100), b).astype(np.float32) for b in batches]
    total = sum(_cm(y, yhat, 3, m) for m in masks)
    np.testing.assert_array_equal(total, _cm(y, yhat, 3))
    ref = precision_recall_fscore_support(y, yhat, average="macro", zero_division=0)[2]
    assert em.precision_recall_f1(total, "macro")[2] == pytest.approx(ref, rel=1e-12)
    mean_of_batches = np.mean(
        [em.precision_recall_f1(_cm(y, yhat, 3, m), "macro")[2] for m in masks]
    )
    assert abs(mean_of_batches - ref) > 1e-3


def test_jitted_confusion_on_device():
    f = jax.jit(lambda a, b, w: em.confusion_matrix(a, b, 4, w))
    cm = np.asarray(f(jnp.asarray([3, 3, 0]), jnp.asarray([3, 2, 0]), jnp.ones(3)))
    assert cm[3, 3] == 1 and cm[3, 2] == 1 and cm[0, 0] == 1 and cm.sum() == 3


def test_bio_entities_follow_conlleval():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-LOC", "O", "I-ORG", "B-ORG"]
    assert em.bio_entities(tags) == {("PER", 0, 2), ("LOC", 3, 6), ("ORG", 7, 8), ("ORG", 8, 9)}
    # a type change inside a chunk starts a new one; a trailing entity closes at the end
    assert em.bio_entities(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 3)}
    assert em.bio_entities(["O", "O"]) == set() and em.bio_entities([]) == set()
    with pytest.raises(ValueError, match="not BIO"):
        em.bio_entities(["B-PER", "X"])


def test_entity_counts_need_type_and_both_boundaries():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"], ["O", "B-MISC"]]
    pred = [
        ["B-PER", "O", "O", "B-LOC"],  # PER end wrong, LOC right
        ["B-LOC", "I-LOC", "O"],  # boundaries right, type wrong
        ["O", "O"],  # no predicted entity
    ]
    counts = em.entity_counts(gold, pred)
    np.testing.assert_array_equal(counts, [1, 3, 4])
    out = em.entity_metrics(counts)
    assert out["entity_precision"] == pytest.approx(1 / 3)
    assert out["entity_recall"] == pytest.approx(1 / 4)
    assert out["entity_f1"] == pytest.approx(2 / 7)
    # no predicted entities at all: precision 0/0 = 0, recall 0, F1 0
    none = em.entity_metrics(em.entity_counts(gold, [["O"] * len(g) for g in gold]))
    assert none == {"entity_precision": 0.0, "entity_recall": 0.0, "entity_f1": 0.0}
    assert em.entity_metrics(em.entity_counts(gold, gold))["entity_f1"] == 1.0
    with pytest.raises(ValueError, match="2 gold tags but 1"):
        em.entity_counts([["O", "O"]], [["O"]])


def test_squad_normalisation_em_and_f1_by_hand():
    assert em.normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert em.normalize_answer("An apple a day") == "apple day"
    assert em.exact_match("the cat", ["A cat"]) == 1.0
    assert em.exact_match("cat.", ["dog", "Cat"]) == 1.0  # the best gold answer counts
    assert em.exact_match("cats", ["cat"]) == 0.0
    # pred {big, cat, sat} vs gold {cat, sat, down}: 2 common -> P = R = 2/3
    assert em.token_f1("the big cat sat", ["cat sat down"]) == pytest.approx(2 / 3)
    assert em.token_f1("a cat", ["dog", "the cat", "cat cat"]) == 1.0
    # repeated tokens count by multiplicity: pred (cat, cat) vs gold (cat): P 1/2, R 1
    assert em.token_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)
    assert em.token_f1("no overlap", ["at all"]) == 0.0


def test_squad_empty_answers():
    assert em.token_f1("", [""]) == 1.0 and em.exact_match("", [""]) == 1.0
    assert em.token_f1("", ["cat"]) == 0.0 and em.token_f1("cat", [""]) == 0.0
    assert em.exact_match("The", [""]) == 1.0  # only an article: normalises to empty
    counts = em.squad_counts(["cat", "", "big dog"], [["cat"], ["mouse"], ["dog"]])
    np.testing.assert_allclose(counts, [1.0, 1.0 + 0.0 + 2 / 3, 3.0])
    assert em.squad_metrics(counts) == pytest.approx({"exact_match": 1 / 3, "f1": (5 / 3) / 3})
    assert em.squad_metrics(np.zeros(3)) == {"exact_match": 0.0, "f1": 0.0}
    with pytest.raises(ValueError):
        em.exact_match("x", [])


def test_perplexity():
    assert em.perplexity(6.0, 3) == pytest.approx(math.e**2)
    # from a split's sums, not the mean of batch perplexities
    assert em.perplexity(1.0 + 5.0, 1 + 1) == pytest.approx(math.exp(3.0))
    assert math.isnan(em.perplexity(1.0, 0))
    assert em.perplexity(1e6, 1) == pytest.approx(math.exp(80.0))


def test_best_spans_by_hand_with_ties():
    start = jnp.asarray([[9.0, 0.0, 1.0, 3.0, 0.0, 0.0]])
    end = jnp.asarray([[0.0, 9.0, 0.0, 1.0, 4.0, 0.0]])
    ctx = jnp.asarray([[0, 0, 1, 1, 1, 1]])  # positions 0, 1 (question) are never answers
    s, e, score = _best_spans(start, end, ctx, 2)
    assert (int(s[0]), int(e[0]), float(score[0])) == (3, 4, 7.0)
    # one-token answers only: (3, 3) and (4, 4) both score 4; the earlier start wins
    s, e, score = _best_spans(start, end, ctx, 1)
    assert (int(s[0]), int(e[0]), float(score[0])) == (3, 3, 4.0)
    # end before start is never chosen even when it scores more
    s, e, _ = _best_spans(
        jnp.asarray([[0.0, 0.0, 5.0]]), jnp.asarray([[0.0, 5.0, 0.0]]), jnp.asarray([[1, 1, 1]]), 3
    )
    assert int(s[0]) <= int(e[0])
    _, _, score = _best_spans(start, end, jnp.zeros_like(ctx), 2)
    assert float(score[0]) == -np.inf
