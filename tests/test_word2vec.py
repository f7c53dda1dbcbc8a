"""word2vec: the data pipeline against definitions written here, the loss against a NumPy
reference, and training through the real loop on a corpus with planted clusters and analogies."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lmflax import cli
from lmflax import vectors as vec
from lmflax.cli.vectors import from_workdir
from lmflax.config import (
    Config,
    ConfigError,
    DataConfig,
    OptimizerConfig,
    TaskConfig,
    TrainConfig,
    override,
)
from lmflax.data import word2vec as w2v
from lmflax.models import Word2VecConfig
from lmflax.tasks.word2vec import negative_sampling_loss
from lmflax.train import resolve

# ---------------------------------------------------------------------------------------------
# The planted corpus: word (k, s) = topic k's member in slot s. Each sentence holds one member,
# three of its topic's context words, two of its slot's context words and two fillers, shuffled.
# Members of a topic share the most contexts (clusters); the slot contexts are shared across
# topics, so member(k, s') - member(k, s) ≈ member(k', s') - member(k', s) (analogies).

TOPICS, SLOTS = 5, 4
FILLERS = ("the", "of", "and", "a", "to")


def member(k: int, s: int) -> str:
    return f"k{k}s{s}"


def planted_sentences(n: int = 6000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k, s = int(rng.integers(TOPICS)), int(rng.integers(SLOTS))
        words = [member(k, s)]
        words += [f"t{k}x{j}" for j in rng.choice(6, 3, replace=False)]
        words += [f"s{s}y{j}" for j in rng.choice(4, 2, replace=False)]
        words += list(rng.choice(FILLERS, 2))
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


class PlantedWord2vecCorpus(tfds.core.GeneratorBasedBuilder):
    """The planted corpus as a TFDS dataset (ArrayRecord), read like any other."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        # Paragraphs of 10 sentences: windows cross sentence ends, as in running text.
        sentences = planted_sentences()
        for i in range(0, len(sentences), 10):
            yield i, {"text": ". ".join(sentences[i : i + 10]) + "."}


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("planted"))
    builder = PlantedWord2vecCorpus(data_dir=path, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return path


def planted_config(data_dir: str, **model) -> Config:
    return Config(
        model=Word2VecConfig(
            vocab_size=128, d_model=24, window=5, negatives=5, min_count=5, **model
        ),
        task=TaskConfig(name="word2vec"),
        data=DataConfig(
            dataset="planted_word2vec_corpus",
            data_dir=data_dir,
            eval_split="",
            batch_size=1024,
            seq_len=1,
            tokenizer_train_docs=0,
        ),
        train=TrainConfig(steps=300, log_every=50, checkpoint_every=150, progress=False),
        optimizer=OptimizerConfig(
            name="sgd",
            learning_rate=0.025 * 1024,
            warmup_steps=0,
            schedule="linear",
            min_lr_ratio=1e-4,
            weight_decay=0.0,
            clip_norm=0.0,
        ),
    )


@pytest.fixture(scope="module")
def planted_run(planted_dir, tmp_path_factory) -> tuple[Path, vec.WordVectors, dict]:
    from lmflax.train import run

    workdir = tmp_path_factory.mktemp("w2v_run")
    summary = run(planted_config(planted_dir), workdir, config_name="word2vec")
    return workdir, from_workdir(workdir), summary


def test_planted_clusters_are_nearer(planted_run):
    """Same-topic members are nearer each other than to other topics' members, by a margin."""
    _, wv, _ = planted_run
    words = [member(k, s) for k in range(TOPICS) for s in range(SLOTS)]
    u = np.stack([wv.unit[wv.index[w]] for w in words])
    cos = u @ u.T
    topic = np.repeat(np.arange(TOPICS), SLOTS)
    same = (topic[:, None] == topic[None, :]) & ~np.eye(len(words), dtype=bool)
    diff = topic[:, None] != topic[None, :]
    margin = cos[same].mean() - cos[diff].mean()
    print(f"intra-topic cosine {cos[same].mean():.3f}, inter {cos[diff].mean():.3f}")
    assert margin > 0.3
    # Every member's nearest other member is of its own topic.
    np.fill_diagonal(cos, -np.inf)
    assert np.all(topic[cos.argmax(axis=1)] == topic)


def test_planted_analogies_are_solved(planted_run, tmp_path):
    """k:s -> k:s' is the same offset for every topic: a question file of all such analogies,
    read in Google's format and answered by 3CosAdd over the whole vocabulary."""
    _, wv, _ = planted_run
    lines = [": planted"]
    for k1, k2 in itertools.permutations(range(TOPICS), 2):
        for s1, s2 in itertools.permutations(range(SLOTS), 2):
            lines.append(f"{member(k1, s1)} {member(k1, s2)} {member(k2, s1)} {member(k2, s2)}")
    path = tmp_path / "questions-words.txt"
    path.write_text("\n".join(lines) + "\n")
    result = vec.evaluate_analogies(wv, path)
    print(f"planted analogies: {result.correct}/{result.total}")
    assert result.total == TOPICS * (TOPICS - 1) * SLOTS * (SLOTS - 1)
    assert result.oov == 0
    assert result.accuracy >= 0.8


def test_planted_similarity_list(planted_run, tmp_path):
    """A word-similarity file scoring same-topic pairs 10 and others 0 correlates positively."""
    _, wv, _ = planted_run
    rows = ["# word1\tword2\tscore"]
    for (k1, s1), (k2, s2) in itertools.combinations(
        itertools.product(range(TOPICS), range(SLOTS)), 2
    ):
        rows.append(f"{member(k1, s1)}\t{member(k2, s2)}\t{10 if k1 == k2 else 0}")
    rows.append("k0s0\tnot_a_word\t5")
    path = tmp_path / "planted-sim.tsv"
    path.write_text("\n".join(rows) + "\n")
    result = vec.evaluate_similarity(wv, path)
    assert result.oov == 1
    assert result.pairs == len(rows) - 2
    assert result.spearman > 0.5


def test_planted_run_logs_and_samples(planted_run):
    workdir, wv, summary = planted_run
    assert summary["final_step"] == 300
    assert "nearest neighbours" in summary["sample"]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "150",
        "300",
    ]
    # The vocabulary: every planted word and filler, nothing else, most frequent first.
    assert set(wv.words) == set(w2v.count_words(planted_sentences()))
    assert set(wv.words[:5]) == set(FILLERS)


def test_viz_word2vec_projection(planted_run, tmp_path):
    from PIL import Image

    workdir, _, _ = planted_run
    words = ",".join(member(k, s) for k in range(TOPICS) for s in range(SLOTS))
    assert (
        cli.main(
            [
                "viz",
                "attention",
                "--workdir",
                str(workdir),
                "--words",
                words,
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    with Image.open(tmp_path / "word_vectors_pca.png") as im:
        assert im.size == (640, 640)


# ---------------------------------------------------------------------------------------------
# Pipeline pieces, against definitions written here


def test_vocabulary_min_count_order_and_cap():
    counts = Counter({"b": 5, "a": 5, "c": 9, "d": 1, "e": 2})
    v = w2v.Vocabulary.from_counts(counts, min_count=2, max_size=10)
    assert v.words == ("c", "a", "b", "e")  # by count, ties alphabetically; 'd' below min_count
    assert w2v.Vocabulary.from_counts(counts, min_count=2, max_size=2).words == ("c", "a")
    ids, raw = v.encode("C x a, D b!")
    assert ids.tolist() == [0, 1, 2] and raw == 5


def test_keep_probability_is_word2vec_formula():
    v = w2v.Vocabulary(["x", "y", "z"], [900, 90, 10])
    sample, total = 1e-2, 1000
    # The C tool: ran = (sqrt(cn / (sample * train_words)) + 1) * (sample * train_words) / cn
    for cn, p in zip([900, 90, 10], v.keep_probabilities(sample)):
        ran = (np.sqrt(cn / (sample * total)) + 1) * (sample * total) / cn
        assert p == pytest.approx(min(ran, 1.0))
    assert np.all(v.keep_probabilities(0.0) == 1.0)


def _reference_pairs(ids, b, window, cbow):
    """Every (inputs, target) by the definition: centre i with reduced window b[i]."""
    n = len(ids)
    out = []
    for i in range(n):
        ctx = [j for j in range(max(0, i - b[i]), min(n, i + b[i] + 1)) if j != i]
        if cbow:
            if ctx:
                out.append((tuple(sorted(int(ids[j]) for j in ctx)), int(ids[i])))
        else:
            out += [((int(ids[j]),), int(ids[i])) for j in ctx]
    return sorted(out)


@pytest.mark.parametrize("cbow", [False, True])
def test_examples_match_the_window_definition(cbow):
    ids = np.random.default_rng(0).integers(0, 50, 40).astype(np.int32)
    window = 4
    ex = w2v.make_examples(
        ids, 41, np.random.default_rng(7), keep_prob=None, window=window, cbow=cbow
    )
    b = np.random.default_rng(7).integers(1, window + 1, size=len(ids))  # the same draws
    got = []
    for inp, mask, t in zip(ex["inputs"], ex["input_mask"], ex["targets"]):
        got.append((tuple(sorted(int(x) for x, m in zip(inp, mask) if m)), int(t)))
    assert sorted(got) == _reference_pairs(ids, b, window, cbow)
    assert ex["inputs"].shape[1] == (2 * window if cbow else 1)
    assert ex["words"].sum() == 41 and ex["words"][0] == 41
    assert np.all(ex["weights"] == 1)


def test_subsampling_keeps_words_at_the_stated_rate():
    ids = np.repeat(np.arange(3, dtype=np.int32), 20000)
    keep = np.array([1.0, 0.5, 0.1])
    ex = w2v.make_examples(
        ids, len(ids), np.random.default_rng(1), keep_prob=keep, window=1, cbow=True
    )
    kept = np.bincount(ex["targets"], minlength=3) / 20000
    np.testing.assert_allclose(kept, keep, atol=0.01)


def test_negatives_follow_unigram_to_the_075():
    v = w2v.Vocabulary(list("abcd"), [1000, 100, 10, 1])
    cdf = v.noise_cdf(0.75)
    draws = w2v.draw_negatives(np.zeros(50000), np.random.default_rng(0), cdf=cdf, negatives=4)
    freq = np.bincount(draws.ravel(), minlength=4) / draws.size
    want = np.array([1000, 100, 10, 1]) ** 0.75
    np.testing.assert_allclose(freq, want / want.sum(), atol=0.005)


def test_pipeline_resumes_exactly(planted_dir):
    from lmflax.tasks import make_task

    task = make_task(planted_config(planted_dir, architecture="cbow"))
    ds = task.dataset("train", seed=3, batch_size=64)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = iter(task.dataset("train", seed=3, batch_size=64))
    it2.set_state(state)
    for a, b in zip(want, [next(it2) for _ in range(3)]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    batch = want[0]
    assert batch["inputs"].shape == (64, 10) and batch["negatives"].shape == (64, 5)
    assert batch["input_mask"].sum(1).min() >= 1


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 4)).astype(np.float32)
    targets = np.array([1, 2, 3, 4, 5, 6], np.int32)
    negatives = rng.integers(1, 7, (6, 3)).astype(np.int32)
    negatives[0, 1] = targets[0]  # a noise word equal to the target is skipped
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)
    loss, metrics = jax.jit(negative_sampling_loss)(logits, targets, negatives, weights)

    def log_sigmoid(x):
        return -np.log1p(np.exp(-np.float64(x)))

    want = 0.0
    for b in range(5):
        want -= log_sigmoid(logits[b, 0])
        for k in range(3):
            if negatives[b, k] != targets[b]:
                want -= log_sigmoid(-logits[b, k + 1])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(metrics["loss"][1]) == 5


def test_config_rejects_transformer_settings_and_bad_values():
    cfg = planted_config("/nonexistent")
    resolve(cfg)
    with pytest.raises(ConfigError, match=r"model.num_heads=8 is a Transformer setting"):
        resolve(override(cfg, {"model.num_heads": 8}))
    with pytest.raises(ConfigError, match=r"model.architecture is 'skipgrams'.*'cbow'"):
        resolve(override(cfg, {"model.architecture": "skipgrams"}))
    with pytest.raises(ConfigError, match=r"model.window must be > 0, got 0"):
        resolve(override(cfg, {"model.window": 0}))
    with pytest.raises(ConfigError, match=r"optimizer.name is 'sdg'"):
        resolve(override(cfg, {"optimizer.name": "sdg"}))
    with pytest.raises(ConfigError, match=r"task 'word2vec' trains a word2vec model"):
        from lmflax.models import PRESETS
        from lmflax.train import Trainer

        Trainer.create(override(cfg, {"model": PRESETS["gpt_tiny"]}), init=False)


def test_model_gradient_touches_only_batch_rows():
    """Sparse in effect: a step changes only the rows of words in the batch (SGD, no decay)."""
    from lmflax.models import Word2Vec

    model = Word2Vec(Word2VecConfig(vocab_size=32, d_model=8))
    inputs = jnp.array([[3], [5]], jnp.int32)
    mask = jnp.ones((2, 1))
    cands = jnp.array([[7, 9, 11], [8, 9, 12]], jnp.int32)
    rng = np.random.default_rng(0)
    p = {
        "input_embed": {"embedding": rng.standard_normal((32, 8)).astype(np.float32)},
        "output_embed": {"embedding": rng.standard_normal((32, 8)).astype(np.float32)},
    }

    def loss(p):
        logits = model.apply({"params": p}, inputs, mask, cands)
        return jnp.sum(jax.nn.softplus(-logits[:, 0]) + jax.nn.softplus(logits[:, 1:]).sum(-1))

    g = jax.jit(jax.grad(loss))(p)
    gin = np.abs(np.asarray(g["input_embed"]["embedding"])).sum(1)
    gout = np.abs(np.asarray(g["output_embed"]["embedding"])).sum(1)
    assert set(np.nonzero(gin)[0]) == {3, 5}
    assert set(np.nonzero(gout)[0]) == {7, 8, 9, 11, 12}


def test_shipped_config_variants():
    from lmflax.config import load_config_file

    sg, _ = load_config_file("configs/word2vec.py")
    cbow, _ = load_config_file("configs/word2vec.py:cbow")
    assert (sg.model.architecture, cbow.model.architecture) == ("skipgram", "cbow")
    assert cbow.optimizer.learning_rate == 0.05 * cbow.data.batch_size
    assert sg.optimizer.learning_rate == 0.025 * sg.data.batch_size
    assert sg.optimizer.name == "sgd" and sg.optimizer.schedule == "linear"
    assert sg.optimizer.warmup_steps == 0
    with pytest.raises(ConfigError, match=r"takes 'skipgram' or 'cbow', got 'sg'"):
        load_config_file("configs/word2vec.py:sg")


def test_sgd_optimizer_is_plain_sgd_with_the_schedule():
    from lmflax.core.optim import make_optimizer

    opt = OptimizerConfig(
        name="sgd", learning_rate=2.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0
    )
    tx, schedule = make_optimizer(dataclasses.replace(opt, clip_norm=0.0, weight_decay=0.0), 4)
    params = {"embedding": np.ones((2, 2), np.float32)}
    grads = {"embedding": np.full((2, 2), 0.25, np.float32)}
    state = tx.init(params)
    for step, lr in enumerate([2.0, 1.5, 1.0]):  # linear from 2 to 0 over 4 steps
        assert float(schedule(step)) == pytest.approx(lr)
        updates, state = tx.update(grads, state, params)
        np.testing.assert_allclose(np.asarray(updates["embedding"]), -lr * 0.25, rtol=1e-6)


def _word2vec_c_update(syn0, syn1neg, inputs, mask, targets, negatives, weights, alpha):
    """word2vec.c's update for a batch, in float64, each example from the same starting tables
    (a batch step sums them): CBOW/skip-gram with negative sampling, as in TrainModelThread.

    neu1 = the mean of the cw input vectors; for the target (label 1) and each noise word that
    is not the target (label 0): g = (label - σ(neu1·syn1neg[w]))·α, neu1e += g·syn1neg[w],
    syn1neg[w] += g·neu1; then every input vector gets syn0[c] += neu1e, the full error (the
    exact sigmoid here; word2vec.c tabulates it and clips |f| > 6, which these scores stay under).
    """
    d0, d1 = np.zeros_like(syn0), np.zeros_like(syn1neg)
    for b in range(len(inputs)):
        if weights[b] == 0:
            continue
        ctx = [int(w) for w, m in zip(inputs[b], mask[b]) if m]
        neu1 = sum(syn0[w] for w in ctx) / len(ctx)
        neu1e = np.zeros_like(neu1)
        for d, (w, label) in enumerate([(targets[b], 1.0)] + [(n, 0.0) for n in negatives[b]]):
            if d > 0 and w == targets[b]:
                continue
            f = neu1 @ syn1neg[w]
            assert abs(f) < 6
            g = (label - 1.0 / (1.0 + np.exp(-f))) * alpha
            neu1e += g * syn1neg[w]
            d1[w] += g * neu1
        for w in ctx:
            d0[w] += neu1e
    return d0, d1


@pytest.mark.parametrize("arch", ["cbow", "skipgram"])
def test_update_is_word2vec_c(arch):
    """One SGD step at α moves the tables exactly as word2vec.c would (float64 NumPy), CBOW
    included: each context word gets the whole error of the averaged context, not 1/cw of it."""
    from lmflax.models import Word2Vec

    V, D, B, K, alpha = 40, 8, 6, 4, 0.05
    cfg = Word2VecConfig(vocab_size=V, d_model=D, window=2, negatives=K, architecture=arch)
    C = cfg.num_inputs
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, V, (B, C)).astype(np.int32)
    mask = (np.arange(C)[None] < rng.integers(1, C + 1, (B, 1))).astype(np.float32)
    if C > 1:
        inputs[0, 1] = inputs[0, 0]  # a word twice in one window counts twice
        mask[0, :2] = 1
    targets = rng.integers(0, V, B).astype(np.int32)
    negatives = np.stack(
        [rng.choice(np.delete(np.arange(V), t), K, replace=False) for t in targets]
    )
    negatives[1, 2] = targets[1]  # a noise word equal to the target is skipped
    negatives = negatives.astype(np.int32)
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last is padding
    params = {
        "input_embed": {"embedding": rng.uniform(-0.5, 0.5, (V, D)).astype(np.float32)},
        "output_embed": {"embedding": rng.uniform(-0.5, 0.5, (V, D)).astype(np.float32)},
    }
    model = Word2Vec(cfg)
    cands = np.concatenate([targets[:, None], negatives], 1)

    def loss(p):
        logits = model.apply({"params": p}, inputs, mask, cands)
        return negative_sampling_loss(logits, targets, negatives, weights)[0]

    grads = jax.jit(jax.grad(loss))(params)
    want0, want1 = _word2vec_c_update(
        params["input_embed"]["embedding"].astype(np.float64),
        params["output_embed"]["embedding"].astype(np.float64),
        inputs, mask, targets, negatives, weights, alpha,
    )  # fmt: skip
    got0 = -alpha * np.asarray(grads["input_embed"]["embedding"], np.float64)
    got1 = -alpha * np.asarray(grads["output_embed"]["embedding"], np.float64)
    assert np.abs(want0).max() > 1e-3 and np.abs(want1).max() > 1e-3
    np.testing.assert_allclose(got0, want0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got1, want1, rtol=1e-5, atol=1e-7)
