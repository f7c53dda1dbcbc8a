"""Encoder-decoders: relative position buckets, published sizes, the models' properties, the
seq2seq data and metrics, an offline learning check, and the shipped translation and
summarization configs end to end on mocked TFDS data (with `train.py --generate`)."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmflax import decode
from lmflax import nn as lnn
from lmflax.config import ConfigError, apply_overrides, load_config_file, override
from lmflax.data import seq2seq as s2s_data
from lmflax.data.tokenizers import train_tokenizer
from lmflax.evaluate.generation import bleu, generation_metrics, rouge
from lmflax.models import PRESETS, EncoderDecoder
from lmflax.models.seq2seq import relative_position_bucket
from lmflax.tasks.seq2seq import seq2seq_loss
from lmflax.train import resolve
from lmflax.train.metrics import read_metrics

from .conftest import ROOT
from .test_decode import random_params

SMALL = dict(vocab_size=53, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=64)


def _bucket_reference(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucketing written out for one relative position (key - query), float64."""
    n = -rel
    ret = 0
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        + 1e-9
    )
    return ret + min(large, num_buckets - 1)


def test_relative_position_buckets():
    rel = np.arange(-300, 301)
    for bidirectional in (True, False):
        got = np.asarray(
            relative_position_bucket(
                jnp.asarray(rel), bidirectional=bidirectional, num_buckets=32, max_distance=128
            )
        )
        want = [_bucket_reference(int(r), bidirectional, 32, 128) for r in rel]
        np.testing.assert_array_equal(got, want)
    # By hand (32 buckets, 128): a key one before the query -> 1, one after -> 16 + 1; exact up
    # to 7 back; 20 after -> 16 + 8 + floor(8·log(20/8)/log 16) = 26; 127+ back -> 15.
    b = lambda r, bi=True: int(  # noqa: E731
        relative_position_bucket(jnp.asarray(r), bidirectional=bi, num_buckets=32, max_distance=128)
    )
    assert [b(0), b(-1), b(1), b(-7), b(-8), b(20), b(-127), b(-1000)] == [
        0,
        1,
        17,
        7,
        8,
        26,
        15,
        15,
    ]
    # Causal: the future is bucket 0; 20 back -> 16 + floor(16·log(20/16)/log 8) = 17.
    assert [b(5, False), b(-3, False), b(-20, False), b(-200, False)] == [0, 3, 17, 31]


def _count(model, ids):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, deterministic=True))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lnn.unbox(shapes["params"])))


def test_t5_presets_have_the_published_sizes():
    """t5-small has 60,506,624 parameters and t5-base 222,903,552 (Hugging Face's counts): the
    T5 layout (no biases, RMSNorm scales, one relative-bias table per stack, tied embeddings)."""
    ids = jnp.zeros((1, 8), jnp.int32)
    assert _count(EncoderDecoder(PRESETS["t5_small"]), ids) == 60_506_624
    assert _count(EncoderDecoder(PRESETS["t5_base"]), ids) == 222_903_552


@pytest.mark.parametrize("kind", ["transformer_tiny", "t5_tiny"])
def test_models_share_embeddings_and_decoders_are_causal(kind):
    cfg = dataclasses.replace(PRESETS[kind], **SMALL)
    model = EncoderDecoder(cfg)
    src = jax.random.randint(jax.random.key(0), (2, 7), 2, 53)
    tgt = jax.random.randint(jax.random.key(1), (2, 6), 2, 53)
    p = random_params(model, src, tgt)
    variables = {"params": p}
    assert "lm_head" not in p and p["token_embed"]["embedding"].shape == (53, 32)
    leaves = jax.tree_util.tree_flatten_with_path(p)[0]
    names = {jax.tree_util.keystr(k) for k, _ in leaves}
    if kind == "t5_tiny":
        assert not any("bias']" in n and "relative" not in n for n in names), "T5 has no biases"
        assert "final_norm" in p["encoder"] and "encoder_relative_bias" in p
    else:
        assert "final_norm" not in p["encoder"], "post-norm stacks end without a norm"

    @jax.jit
    def run(variables, src, tgt):
        logits = model.apply(variables, src, tgt, deterministic=True)
        hidden = model.apply(variables, src, tgt, deterministic=True, return_hidden=True)
        return logits, hidden

    y, h = run(variables, src, tgt)
    y2, _ = run(variables, src, tgt.at[:, 3:].set(5))
    np.testing.assert_allclose(np.asarray(y[:, :3]), np.asarray(y2[:, :3]), atol=1e-5)
    assert not np.allclose(np.asarray(y[:, 3:]), np.asarray(y2[:, 3:]), atol=1e-3)
    # The tied output: hidden @ embeddingᵀ (× D^-½ for T5).
    scale = 32**-0.5 if kind == "t5_tiny" else 1.0
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(h @ p["token_embed"]["embedding"].T) * scale, atol=1e-5
    )


@pytest.mark.parametrize(
    "updates,expected",
    [
        ({"model.position": "relatve"}, "accepted for seq2seq"),
        ({"model.num_decoder_layers": 0}, "num_decoder_layers must be > 0"),
        ({"model.relative_buckets": 5}, "relative_buckets must be even"),
        ({"task.metrics": ("blue",)}, "did you mean 'bleu'"),
        ({"task.target_len": 0}, "task.target_len must be > 0"),
        ({"generate.top_p": 0.0}, "generate.top_p"),
        ({"generate.beam_size": 0}, "generate.beam_size"),
    ],
)
def test_impossible_seq2seq_values(updates, expected):
    cfg, _ = load_config_file("configs/cnn_dailymail.py:tiny")
    with pytest.raises(ConfigError, match=expected):
        resolve(override(cfg, updates))


def test_seq2seq_task_needs_an_encoder_decoder():
    from lmflax.tasks import make_task

    cfg, _ = load_config_file("configs/wmt14_de_en.py:tiny")
    with pytest.raises(ConfigError, match="trains an encoder-decoder; model family is 'gpt'"):
        make_task(override(cfg, {"model": PRESETS["gpt_tiny"]}))
    with pytest.raises(ConfigError, match=r"target_len .* longer than the model's sinusoidal"):
        make_task(override(cfg, {"task.target_len": 1000}))
    with pytest.raises(ConfigError, match="unknown variant 'huge'"):
        load_config_file("configs/wmt14_de_en.py:huge")


def test_generation_metrics_by_hand():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    # Detokenized input: sacrebleu's 13a tokenization splits the punctuation itself.
    assert bleu(["Hello, world!"], ["Hello , world !"]) == pytest.approx(100)
    # a b c d vs a b c e: precisions 3/4, 2/3, 1/2 and 0/1, which 'exp' smoothing makes
    # 1/(2·1); equal lengths, so no brevity penalty: (3/4 · 2/3 · 1/2 · 1/2)^(1/4).
    assert bleu(["a b c d"], ["a b c e"]) == pytest.approx(100 * 0.125**0.25, rel=1e-6)
    # "the cat sat" vs "the cat sat on the mat": unigrams P 3/3 R 3/6, bigrams P 2/2 R 2/5, LCS 3.
    r = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(100 * 2 / 3)
    assert r["rouge2"] == pytest.approx(100 * 2 * 0.4 / 1.4)
    assert r["rougeL"] == pytest.approx(100 * 2 / 3)
    # Lsum, sentences = lines. Reference "a b c" / "d e", prediction "a b" / "d x c": the
    # reference's first sentence shares a b with one line and c with the other (union 3), its
    # second d (1): 4 of 5 tokens each way, F 0.8. The whole texts' LCS is 3 (a b c): F 0.6.
    r = rouge(["a b\nd x c"], ["a b c\nd e"])
    assert r["rougeLsum"] == pytest.approx(100 * 0.8)
    assert r["rougeL"] == pytest.approx(100 * 0.6)
    assert set(generation_metrics(("bleu", "rouge"), ["x"], ["x"])) == {
        "bleu",
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
    }
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(["a", "b"], ["a"])


def test_pairs_become_padded_examples():
    tok = train_tokenizer("bpe", iter(["ein kleiner Test", "a small test"] * 20), 300)
    src, tgt = "ein kleiner Test", "a small test"
    ex = s2s_data.encode_pair(tok, src, tgt, source_len=12, target_len=10)
    eos, pad = tok.eos_id, tok.pad_id
    s_ids, t_ids = tok.encode(src), tok.encode(tgt)
    n_s, n_t = len(s_ids) + 1, len(t_ids) + 1
    np.testing.assert_array_equal(ex["inputs"][:n_s], [*s_ids, eos])
    assert (ex["inputs"][n_s:] == pad).all() and ex["inputs_mask"].tolist() == [1] * n_s + [0] * (
        12 - n_s
    )
    np.testing.assert_array_equal(ex["targets"][:n_t], [*t_ids, eos])
    np.testing.assert_array_equal(ex["decoder_inputs"][:n_t], [eos, *t_ids])
    assert ex["weights"].tolist() == [1.0] * n_t + [0.0] * (10 - n_t)
    short = s2s_data.encode_pair(tok, src, tgt, source_len=3, target_len=2)
    assert short["inputs"].tolist() == [*s_ids[:2], eos] and short["targets"].tolist() == [
        t_ids[0],
        eos,
    ]
    with pytest.raises(s2s_data.DataError, match=r"no feature 'de' \(task.source_key\)"):
        s2s_data.pair_of({"en": "x", "fr": "y"}, "de", "en", 3)


# ---------------------------------------------------------------------------------------------
# Learning


def _reversal_batch(rng: np.random.Generator, n: int, vocab: int, length: int) -> dict:
    """Random token sequences (3..length-2 tokens from 2..vocab-1, then EOS = 1) and their
    reversals as targets; the decoder starts from EOS."""
    out = {
        k: np.zeros((n, length), np.int32)
        for k in ("inputs", "inputs_mask", "decoder_inputs", "targets")
    }
    out["weights"] = np.zeros((n, length), np.float32)
    for b, L in enumerate(rng.integers(3, length - 1, n)):
        toks = rng.integers(2, vocab, L)
        rev = [*toks[::-1], 1]
        out["inputs"][b, : L + 1] = [*toks, 1]
        out["inputs_mask"][b, : L + 1] = 1
        out["targets"][b, : L + 1] = rev
        out["decoder_inputs"][b, : L + 1] = [1, *rev[:-1]]
        out["weights"][b, : L + 1] = 1
    return out


@pytest.mark.slow
def test_tiny_encoder_decoder_learns_to_reverse_sequences():
    """A synthetic translation task (reverse 3-6 tokens over 10 symbols): a 2+2-layer T5-style
    model trained for 300 steps on CPU translates held-out sequences with beam search at
    BLEU >= 90 (sacrebleu on the token strings)."""
    V, L, steps = 12, 8, 300
    cfg = dataclasses.replace(PRESETS["t5_tiny"], vocab_size=V, d_model=64, d_ff=128, max_len=32)
    model = EncoderDecoder(cfg)
    rng = np.random.default_rng(0)
    ids = jnp.ones((1, L), jnp.int32)
    params = random_params(model, ids, ids, std=cfg.init_std, like_init=True)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 5e-3, 50, steps, 3e-4))
    opt = tx.init(params)

    @jax.jit
    def train_step(params, opt, batch):
        def loss(p):
            total, metrics = seq2seq_loss(model, p, batch, jax.random.key(0), True)
            return total / metrics["loss"][1]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    for _ in range(steps):
        params, opt, value = train_step(params, opt, _reversal_batch(rng, 64, V, L))
    test = _reversal_batch(np.random.default_rng(123), 64, V, L)
    out = decode.beam_search(
        model,
        params,
        jnp.ones((64, 1), jnp.int32),
        beam_size=4,
        max_new_tokens=L,
        eos_id=1,
        encoder_inputs=jnp.asarray(test["inputs"]),
        encoder_mask=jnp.asarray(test["inputs_mask"]),
    )
    words = lambda row: " ".join(f"w{t}" for t in decode.until_eos(row, 1))  # noqa: E731
    predictions = [words(r) for r in np.asarray(out.sequences[:, 0])]
    references = [words(r) for r in test["targets"]]
    score = bleu(predictions, references)
    assert score >= 90, (score, float(value), predictions[:4], references[:4])


# ---------------------------------------------------------------------------------------------
# The shipped configs end to end on mocked TFDS data

MOCK_OVERRIDES = [
    "train.steps=4",
    "train.checkpoint_every=0",
    "train.eval_steps=1",
    "train.progress=false",
    "data.batch_size=4",
    "data.seq_len=24",
    "data.tokenizer_train_docs=16",
    "task.target_len=10",
    "model.vocab_size=400",
    "model.d_model=32",
    "model.d_ff=64",
    "generate.eval_examples=6",
]


@pytest.fixture
def mock_tfds():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,metrics,beams",
    [
        ("wmt14_de_en", ["bleu"], 2),
        ("cnn_dailymail", ["rouge1", "rouge2", "rougeL", "rougeLsum"], 1),
    ],
)
def test_config_runs_end_to_end_on_mock_data(
    config, metrics, beams, mock_tfds, tmp_path, capsys, monkeypatch
):
    """The shipped config (its tiny variant, smaller still) trains, evaluates, decodes the
    evaluation examples, scores them and writes the predictions; `train.py --generate` then
    loads the checkpoint and translates / summarises prompts."""
    import train
    from lmflax.train import run

    cfg, _ = load_config_file(f"configs/{config}.py:tiny")
    overrides = [
        *MOCK_OVERRIDES,
        f"data.data_dir={tmp_path / 'data'}",
        f"generate.beam_size={beams}",
    ]
    cfg = resolve(apply_overrides(cfg, overrides))
    workdir = tmp_path / "run"
    summary = run(cfg, workdir)
    assert summary["final_step"] == 4 and math.isfinite(summary["final_loss"])
    assert sorted(summary["generation"]) == sorted(metrics)
    assert all(0.0 <= v <= 100.0 for v in summary["generation"].values())
    predictions = [json.loads(x) for x in (workdir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6
    assert all(set(p) == {"source", "reference", "prediction"} for p in predictions)
    assert all(p["source"] and p["reference"] for p in predictions)
    evals = {
        k: v for record in read_metrics(workdir / "eval_metrics.jsonl") for k, v in record.items()
    }
    assert evals["step"] == 4 and "loss" in evals and all(m in evals for m in metrics)
    tokenizer = (tmp_path / "data" / "lmflax_tokenizers").glob("*+*-bpe-400-16.json")
    assert len(list(tokenizer)) == 1, "one joint vocabulary for both sides"

    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    code = train.main(
        [
            f"--config={ROOT / 'configs' / config}.py:tiny",
            f"--workdir={workdir}",
            "--generate",
            "--prompt=abc def",
            "--prompt=gh ij",
            "--config.generate.beam_size=3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"model from {workdir} at step 4; beam search, 3 beams" in out
    assert ">>> abc def" in out and ">>> gh ij" in out
