"""Fine-tuning: heads, featurizers (sub-token alignment, QA windows, mapping back), config and
dataset errors, every task config end to end under tfds.testing.mock_data, --eval_only on a
checkpoint, and learning checks on synthetic data these tests make."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lmflax.config import ConfigError, load_config_file, override
from lmflax.data import tasks as data_tasks
from lmflax.data.tokenizers import train_tokenizer
from lmflax.models import (
    PRESETS,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPTForSequenceClassification,
)
from lmflax.models.heads import pool
from lmflax.tasks import make_task
from lmflax.tasks.tagging import word_tags
from lmflax.train.metrics import read_metrics

from .conftest import ROOT


@pytest.fixture(autouse=True)
def _rbg_keys():
    """XLA compiles threefry's hash slowly on CPU (init of even a one-layer model takes seconds);
    the hardware RBG generator compiles ~4x faster. Only these tests' keys change."""
    with jax.default_prng_impl("rbg"):
        yield


# ---------------------------------------------------------------------------------------------
# Synthetic data in the record formats of glue/sst2, conll2003 and squad

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
    "that",
    "with",
    "from",
    "of",
    "on",
]
POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "brilliant", "wonderful"]
NEGATIVE = ["bad", "awful", "poor", "boring", "terrible", "sad", "dull", "horrible"]
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
ENTITIES = {
    "PER": ["john smith", "mary jones", "alice", "bob brownstein", "zelda quartermaine"],
    "ORG": ["acme corporation", "globex", "initech systems international"],
    "LOC": ["paris", "london", "new york", "kathmandu"],
    "MISC": ["french", "olympic", "byzantine"],
}
COLOURS = ["red", "green", "blue", "amber", "violet", "crimson", "silver", "golden"]
SHADES = ["dark", "light", "pale", "deep"]


def sentiment_records(n: int, seed: int) -> list[dict]:
    """Filler words with one polar word somewhere; the label is its polarity."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = list(rng.choice(FILLER, rng.integers(3, 10)))
        label = int(rng.integers(2))
        words.insert(
            int(rng.integers(len(words) + 1)), str(rng.choice(POSITIVE if label else NEGATIVE))
        )
        out.append({"idx": np.int32(i), "label": np.int64(label), "sentence": " ".join(words)})
    return out


def tagging_records(n: int, seed: int) -> list[dict]:
    """Filler words and 1-3 entities of 1-3 words (never adjacent), BIO-tagged."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(int(rng.integers(1, 4))):
            filler = list(rng.choice(FILLER, rng.integers(1, 4)))
            kind = str(rng.choice(list(ENTITIES)))
            entity = str(rng.choice(ENTITIES[kind])).split()
            words += filler + entity
            tags += [0] * len(filler)
            tags += [CONLL_TAGS.index(f"B-{kind}")] + [CONLL_TAGS.index(f"I-{kind}")] * (
                len(entity) - 1
            )
        tail = list(rng.choice(FILLER, rng.integers(0, 3)))
        words, tags = words + tail, tags + [0] * len(tail)
        zeros = np.zeros(len(words), np.int64)
        out.append(
            {
                "tokens": np.asarray(words),
                "ner": np.asarray(tags, np.int64),
                "pos": zeros,
                "chunks": zeros,
            }
        )
    return out


def squad_records(n: int, seed: int) -> list[dict]:
    """Filler sentences around 'The secret code is ANSWER.'; ANSWER is a colour, half the time
    after a shade (a two-word span). Contexts run to 2-3 windows of a 64-token row."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pieces = [
            " ".join(rng.choice(FILLER, rng.integers(4, 9))) + "."
            for _ in range(int(rng.integers(4, 10)))
        ]
        answer = str(rng.choice(COLOURS))
        if rng.random() < 0.5:
            answer = f"{rng.choice(SHADES)} {answer}"
        pieces.insert(int(rng.integers(len(pieces) + 1)), f"The secret code is {answer}.")
        context = " ".join(pieces)
        start = context.index(f"is {answer}.") + 3
        out.append(
            {
                "id": f"q{i}",
                "title": "synthetic",
                "context": context,
                "question": "What is the secret code?",
                "answers": {
                    "text": np.asarray([answer]),
                    "answer_start": np.asarray([start], np.int32),
                },
            }
        )
    return out


_MAKERS = {"glue": sentiment_records, "conll2003": tagging_records, "squad": squad_records}


def synthetic_source(n_train: int, n_eval: int):
    """A replacement for DatasetBuilder.as_data_source: the dataset's synthetic records, the
    training split from one seed, every other split from another."""

    def as_data_source(builder, split, **kwargs):
        del kwargs
        train = str(split).startswith("train")
        return _MAKERS[builder.name](n_train if train else n_eval, 0 if train else 1)

    return as_data_source


# ---------------------------------------------------------------------------------------------
# Configs

# One shape per task family, shared by the mock runs and the learning checks, so the session's
# compilation cache compiles each family once.
TINY = {
    "model.vocab_size": 256,
    "model.num_layers": 1,
    "model.d_model": 32,
    "model.d_ff": 64,
    "data.batch_size": 16,
    "data.seq_len": 32,
    "train.log_every": 2,
    "train.checkpoint_every": 0,
    "train.progress": False,
    "optimizer.learning_rate": 3e-3,
    # a schedule that does not depend on train.steps keeps the compiled step the same for the
    # short mock runs and the longer learning runs
    "optimizer.schedule": "constant",
    "optimizer.warmup_steps": 4,
}
PER_CONFIG = {
    "sst2": {},
    "imdb": {},
    # 160 entries: rare names split into several WordPieces, so alignment matters
    "conll2003": {"model.vocab_size": 160},
    "squad": {
        "data.seq_len": 64,
        "task.max_query_len": 16,
        "task.doc_stride": 24,
        "task.max_answer_len": 8,
    },
}


def tiny_config(name: str, data_dir, **updates):
    cfg, _ = load_config_file(name)
    return override(cfg, {**TINY, **PER_CONFIG[name], "data.data_dir": str(data_dir), **updates})


# ---------------------------------------------------------------------------------------------
# Heads


SMALL_BERT = dataclasses.replace(
    PRESETS["bert_tiny"], vocab_size=64, num_layers=1, d_model=32, d_ff=64
)
SMALL_GPT = dataclasses.replace(
    PRESETS["gpt_tiny"], vocab_size=64, num_layers=1, d_model=32, d_ff=64
)


def _ids(B=2, T=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(5, 64, (B, T)), jnp.int32)


@pytest.mark.parametrize(
    "model",
    [
        BertForSequenceClassification(SMALL_BERT, 3, "pooled"),
        BertForSequenceClassification(SMALL_BERT, 3, "first"),
        BertForTokenClassification(SMALL_BERT, 9),
        BertForQuestionAnswering(SMALL_BERT),
        GPTForSequenceClassification(SMALL_GPT, 3),
    ],
    ids=["seq-pooled", "seq-first", "token", "qa", "gpt-seq"],
)
def test_heads_shapes_and_logical_axis_names(model):
    ids = _ids()
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids), deterministic=True)
    )
    leaves = jax.tree.leaves(shapes["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(
        isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves
    )
    heads = (
        shapes["params"].get("classifier")
        or shapes["params"].get("qa_outputs")
        or shapes["params"]["score"]
    )
    assert heads["kernel"].names in (("embed", "labels"), ("embed", "span"))
    out = jax.eval_shape(
        lambda p: model.apply(p, ids, jnp.ones_like(ids), deterministic=True), nn.unbox(shapes)
    )
    if isinstance(model, BertForQuestionAnswering):
        assert out.start_logits.shape == out.end_logits.shape == (2, 8)
    elif isinstance(model, BertForTokenClassification):
        assert out.shape == (2, 8, 9)
    else:
        assert out.shape == (2, 3)


def test_pool_first_last_mean_against_numpy():
    h = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    np.testing.assert_allclose(pool(jnp.asarray(h), jnp.asarray(mask), "first"), h[:, 0])
    np.testing.assert_allclose(
        pool(jnp.asarray(h), jnp.asarray(mask), "last"), h[[0, 1, 2], [2, 4, 0]]
    )
    mean = np.stack([h[i, mask[i] > 0].mean(0) for i in range(3)])
    np.testing.assert_allclose(pool(jnp.asarray(h), jnp.asarray(mask), "mean"), mean, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(jnp.asarray(h), None, "max")


def test_gpt_classifier_reads_the_last_real_token_and_ignores_padding():
    model = GPTForSequenceClassification(SMALL_GPT, 2)
    text = np.asarray(_ids(1, 5))[0]
    junk1, junk2 = [7, 8, 9], [30, 31, 32]
    ids = jnp.asarray([[*text, *junk1], [*text, *junk2], [*text, *junk1]], jnp.int32)
    mask = jnp.asarray([[1] * 5 + [0] * 3, [1] * 5 + [0] * 3, [1] * 6 + [0] * 2])
    params = jax.jit(model.init, static_argnames="deterministic")(
        jax.random.key(0), ids, mask, deterministic=True
    )
    logits = jax.jit(model.apply, static_argnames="deterministic")(
        params, ids, mask, deterministic=True
    )
    # what follows the last real token is never read ...
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)
    # ... and one more real token moves the read position
    assert np.abs(np.asarray(logits[0] - logits[2])).max() > 1e-6
    with pytest.raises(ValueError, match="first token sees nothing"):
        GPTForSequenceClassification(SMALL_GPT, 2, "first").init(
            jax.random.key(0), ids, mask, deterministic=True
        )


# ---------------------------------------------------------------------------------------------
# Featurizers


@pytest.fixture(scope="module")
def wordpiece():
    texts = [" ".join(r["tokens"]) for r in tagging_records(300, 0)]
    texts += [r["question"] + " " + r["context"] for r in squad_records(100, 0)]
    return train_tokenizer("wordpiece", iter(texts), 150)


def test_classification_rows(wordpiece):
    ids = wordpiece.encode("the film was great")
    row = data_tasks.classification_features(wordpiece, "the film was great", 1, 32)
    assert row["inputs"].tolist() == [wordpiece.cls_id, *ids, wordpiece.sep_id] + [0] * (
        30 - len(ids)
    )
    assert row["attention_mask"].tolist() == [1] * (len(ids) + 2) + [0] * (30 - len(ids))
    assert row["labels"] == 1 and row["weights"] == 1.0
    long = data_tasks.classification_features(wordpiece, "the film " * 20, 0, 8)
    assert long["inputs"][-1] == wordpiece.sep_id and long["attention_mask"].all()


def test_tagging_alignment_and_mapping_back(wordpiece):
    words = ["zelda", "quartermaine", "was", "in", "kathmandu", ""]
    tags = [1, 2, 0, 0, 5, 0]  # B-PER I-PER O O B-LOC O
    row = data_tasks.tagging_features(wordpiece, words, tags, 32)
    pieces = [wordpiece.backend.encode(w, add_special_tokens=False).ids for w in words]
    assert any(len(p) > 1 for p in pieces)  # some words are several WordPieces
    starts = row["word_starts"]
    expected, pos = [], 1
    for p in pieces:
        expected.append(pos if p else -1)
        pos += len(p)
    assert starts.tolist() == expected  # the empty word has no sub-token
    for w, s in enumerate(starts):
        if s >= 0:
            assert row["inputs"][s] == pieces[w][0] and row["labels"][s] == tags[w]
    assert row["weights"].sum() == sum(1 for p in pieces if p)  # only first sub-tokens count
    # predictions at first sub-tokens become the words' tags; other positions are ignored
    predicted = np.full(32, 3)  # B-ORG everywhere ...
    for w, s in enumerate(starts):
        if s >= 0:
            predicted[s] = tags[w]  # ... except at first sub-tokens
    assert word_tags(predicted, starts, CONLL_TAGS) == ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]
    # a row too short for every word: the cut words read as 'O'
    short = data_tasks.tagging_features(wordpiece, words, tags, 5)
    assert (
        short["word_starts"][-2] == -1
        and word_tags(np.ones(5, int), short["word_starts"], CONLL_TAGS)[-2] == "O"
    )


def test_qa_windows_overlap_cover_the_context_and_hold_the_answer(wordpiece):
    record = squad_records(1, 7)[0]
    context, question = record["context"], record["question"]
    answer = str(record["answers"]["text"][0])
    span = data_tasks.answer_span(context, [answer], [int(record["answers"]["answer_start"][0])])
    assert context[span[0] : span[1]] == answer
    windows = data_tasks.qa_windows(
        wordpiece, question, context, span, seq_len=32, max_query_len=16, doc_stride=8
    )
    n_ctx = len(wordpiece.encode(context))
    q = len(wordpiece.encode(question))
    room = 32 - q - 3
    assert len(windows) == 1 + -(-max(n_ctx - room, 0) // 8)
    covered = set()
    holding = 0
    for k, w in enumerate(windows):
        ctx_pos = np.flatnonzero(w["context_mask"])
        assert ctx_pos[0] == q + 2 and (w["token_type_ids"][ctx_pos] == 1).all()
        first = k * 8  # consecutive windows start doc_stride context tokens apart
        covered.update(range(first, first + len(ctx_pos)))
        s, e = int(w["start_positions"]), int(w["end_positions"])
        if s:
            holding += 1
            assert context[w["offsets"][s][0] : w["offsets"][e][1]] == answer
    assert covered == set(range(n_ctx)) and holding >= 1
    # a window that holds the answer only in part points at [CLS]
    no = data_tasks.qa_windows(
        wordpiece, question, context, None, seq_len=32, max_query_len=16, doc_stride=8
    )
    assert all(int(w["start_positions"]) == 0 == int(w["end_positions"]) for w in no)


def test_answer_span_fallbacks():
    assert data_tasks.answer_span("a b c", ["b"], [2]) == (2, 3)
    assert data_tasks.answer_span("a b c b", ["b"], [0]) == (2, 3)  # wrong start: first occurrence
    assert data_tasks.answer_span("a b c", ["z"], [0]) is None


def test_qa_training_batches_resume_exactly(tmp_path):
    """Windows fanned out of records and window-shuffled still resume at the next batch from a
    JSON round trip of the iterator state (what checkpoints store)."""
    from lmflax.data.pipeline import state_from_json

    cfg = tiny_config("squad", tmp_path, **{"data.batch_size": 4, "data.shuffle_buffer": 8})
    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=synthetic_source(40, 8)
    ):
        task = make_task(cfg)
        it = iter(task.dataset("train", seed=3, batch_size=4))
        for _ in range(5):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(3)]
        resumed = iter(task.dataset("train", seed=3, batch_size=4))
        resumed.set_state(state_from_json(state))
        got = [next(resumed) for _ in range(3)]
    assert set(expected[0]) == set(task.batch_keys)
    for a, b in zip(expected, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not all(np.array_equal(expected[0]["inputs"], b["inputs"]) for b in expected[1:])


# ---------------------------------------------------------------------------------------------
# Errors


def _train(argv, capsys):
    import sys

    sys.path.insert(0, str(ROOT))
    import train

    rc = train.main(argv)
    return rc, capsys.readouterr()


def test_label_count_mismatch_stops_naming_both(tmp_path, capsys):
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        rc, out = _train(
            [
                "--config=sst2",
                f"--workdir={tmp_path / 'w'}",
                f"--config.data.data_dir={tmp_path}",
                "--config.task.num_labels=3",
            ],
            capsys,
        )
    assert rc == 2
    assert "'glue/sst2' has 2 labels (negative, positive)" in out.err
    assert "task.num_labels=3" in out.err and "set task.num_labels=2" in out.err


def test_unknown_or_wrong_dataset_stops_naming_both(tmp_path, capsys):
    rc, out = _train(
        ["--config=sst2", f"--workdir={tmp_path}/a", "--config.data.dataset=glue/sst3"], capsys
    )
    assert rc == 2 and "'glue/sst3'" in out.err and "glue/sst2, imdb_reviews" in out.err
    rc, out = _train(
        ["--config=conll2003", f"--workdir={tmp_path}/b", "--config.data.dataset=imdb_reviews"],
        capsys,
    )
    assert (
        rc == 2
        and "'imdb_reviews'" in out.err
        and "task 'tagging'" in out.err
        and "conll2003" in out.err
    )


@pytest.mark.parametrize(
    ("name", "updates", "expected"),
    [
        ("conll2003", {"model": "gpt_tiny"}, "needs a BERT encoder"),
        ("sst2", {"task.pooling": "last"}, "task.pooling is 'last'"),
        ("sst2", {"model": "gpt_tiny", "task.pooling": "first"}, "accepted for model family 'gpt'"),
        ("squad", {"task.doc_stride": 500}, "task.doc_stride (500)"),
        ("squad", {"data.seq_len": 60}, "must exceed task.max_query_len (64) + 3"),
    ],
)
def test_task_config_errors(name, updates, expected):
    cfg, _ = load_config_file(name)
    with pytest.raises(ConfigError, match=__import__("re").escape(expected)):
        make_task(override(cfg, updates))


# ---------------------------------------------------------------------------------------------
# Every task config end to end under tfds.testing.mock_data


EXPECTED_KEYS = {
    "sst2": {"loss", "accuracy", "precision", "recall", "f1", "macro_f1", "micro_f1", "examples"},
    "imdb": {"loss", "accuracy", "f1", "macro_precision", "micro_recall", "examples"},
    "conll2003": {
        "loss",
        "tag_accuracy",
        "entity_precision",
        "entity_recall",
        "entity_f1",
        "examples",
    },
    "squad": {"loss", "span_accuracy", "exact_match", "f1", "examples"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_task_config_runs_end_to_end_under_mock_data(name, tmp_path, capsys):
    from lmflax.train import run

    n = 12  # fewer than a batch of 16: the one eval batch is padded with weight-0 rows
    cfg = tiny_config(name, tmp_path, **{"train.steps": 4, "train.eval_every": 2})
    workdir = tmp_path / "w"
    with tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = run(cfg, workdir, config_name=name)
        evals = read_metrics(workdir / "eval_metrics.jsonl")
        assert [r["step"] for r in evals] == [2, 4]  # periodic and final, next to metrics.jsonl
        assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [2, 4]
        for r in evals:
            assert EXPECTED_KEYS[name] <= set(r) and np.isfinite(r["loss"])
            assert r["examples"] == n  # the whole split once, padding not counted
            assert all(
                0.0 <= v <= 1.0 for k, v in r.items() if k not in ("step", "loss", "examples")
            )
        assert summary["eval"] == {k: v for k, v in evals[-1].items() if k != "step"}
        if name == "sst2":
            # --eval_only on the workdir: its config.json, its newest checkpoint, same numbers
            rc, out = _train([f"--workdir={workdir}", "--eval_only"], capsys)
            assert rc == 0, out.err
            result = json.loads(out.out.strip().splitlines()[-1])
            assert "checkpoint step 4" in result["source"] and "accuracy" in out.out
            assert result["eval"] == pytest.approx(summary["eval"], rel=1e-6)


def test_eval_only_without_a_checkpoint_evaluates_fresh_parameters(tmp_path, capsys):
    """Only when asked (--fresh): a mistyped workdir is refused, not evaluated at random."""
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        argv = ["--config=imdb", f"--workdir={tmp_path / 'none'}", "--eval_only"]
        argv += [f"--config.{k}={v}" for k, v in {**TINY, "data.data_dir": tmp_path}.items()]
        rc, out = _train(argv, capsys)
        assert rc == 2 and "no finished checkpoint" in out.err and "--fresh" in out.err
        rc, out = _train([*argv, "--fresh"], capsys)
    assert rc == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["source"].startswith("fresh parameters") and result["eval"]["examples"] == 6
    assert not (tmp_path / "none").exists()  # evaluation writes nothing


def test_processes_split_eval_rows_and_their_counts_add_up(tmp_path):
    """What each of 2 processes evaluates is disjoint, covers the split, and its host counts sum
    to the single-process counts (exact aggregation across hosts)."""
    cfg = tiny_config("squad", tmp_path)
    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=synthetic_source(50, 30)
    ):
        task = make_task(cfg)
        shares = [
            task.eval_features("validation", process_index=i, process_count=2) for i in range(2)
        ]
        whole = task.eval_features("validation")
    examples = [{r["example"]["index"] for r in rows} for rows in shares]
    assert not examples[0] & examples[1] and examples[0] | examples[1] == set(range(30))
    assert len(shares[0]) + len(shares[1]) == len(whole)

    def counts(rows):
        """Even-numbered questions answered right (the gold span, in the window holding it),
        odd ones with the first context word, a filler word that shares no token with any
        answer."""
        collector = task.collector()
        start, end, score = [], [], []
        for r in rows:
            first_ctx = int(np.flatnonzero(r["context_mask"])[0])
            if r["example"]["index"] % 2 == 0 and int(r["start_positions"]):
                start.append(int(r["start_positions"])), end.append(int(r["end_positions"]))
                score.append(1.0)
            else:
                start.append(first_ctx), end.append(first_ctx), score.append(0.5)
        collector.add(
            rows, {"start": np.asarray(start), "end": np.asarray(end), "score": np.asarray(score)}
        )
        return collector.counts()["squad"]

    per_process = counts(shares[0]) + counts(shares[1])
    np.testing.assert_array_equal(per_process, [15.0, 15.0, 30.0])
    np.testing.assert_array_equal(counts(whole), per_process)


# ---------------------------------------------------------------------------------------------
# Learning checks: the task configs, shrunk, on synthetic data through the whole pipeline


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "steps", "metric", "threshold"),
    [
        ("sst2", 120, "accuracy", 0.95),
        ("conll2003", 200, "entity_f1", 0.9),
        ("squad", 200, "exact_match", 0.9),
    ],
)
def test_learns_synthetic_task(name, steps, metric, threshold, tmp_path):
    from lmflax.train import run

    cfg = tiny_config(name, tmp_path, **{"train.steps": steps, "train.log_every": 20})
    source = synthetic_source(n_train=2000, n_eval=200)
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=source):
        summary = run(cfg, tmp_path / "w", config_name=name)
    ev = summary["eval"]
    print(f"{name}: {steps} steps -> {json.dumps(ev)}")
    assert ev["examples"] == 200
    assert ev[metric] >= threshold, ev
    losses = [r["loss"] for r in read_metrics(tmp_path / "w" / "metrics.jsonl")]
    assert losses[-1] < 0.3 * losses[0]
