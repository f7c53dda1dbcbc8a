"""Decoding: the KV cache against full forward passes (with padding), sampling filters, beam
search on hand-computed toy distributions and on real models, and decoding under a mesh."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmflax import decode
from lmflax import nn as lnn
from lmflax.models import GPT, PRESETS, EncoderDecoder
from lmflax.models.seq2seq import positions_from_mask

from .conftest import ROOT

# A GPT with everything that touches the cache: GQA, rotary positions, a scanned stack.
TINY_GPT = dataclasses.replace(
    PRESETS["gpt_tiny"],
    vocab_size=61,
    num_layers=2,
    d_model=32,
    d_ff=64,
    num_kv_heads=2,
    max_len=64,
    position="rope",
    rope_base=10000.0,
    scan_layers=True,
)
SMALL = dict(vocab_size=53, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=64)
TINY_S2S = {
    "transformer": dataclasses.replace(PRESETS["transformer_tiny"], **SMALL, scan_layers=True),
    "t5": dataclasses.replace(PRESETS["t5_tiny"], **SMALL, num_decoder_layers=3, scan_layers=True),
}


def random_params(
    model: Any, *args: Any, seed: int = 0, std: float = 0.1, like_init: bool = False, **kw: Any
) -> Any:
    """Parameters of `model` drawn with NumPy: N(0, std) everywhere, norm scales around 1 (with
    like_init: biases 0 and scales 1, the distributions the layers' initialisers use).

    Shapes come from tracing `init` (jax.eval_shape): nothing is compiled. A jitted Flax init
    costs seconds of XLA CPU compile per small model here (every parameter's threefry draw is
    compiled), which tests that only need some weights should not pay.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, deterministic=True, **kw))[
        "params"
    ]
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: Any) -> jax.Array:
        name = path[-1].key
        x = rng.normal(0.0, std, leaf.shape)
        if like_init and name in ("scale", "bias"):
            x = np.full(leaf.shape, 1.0 if name == "scale" else 0.0)
        elif name == "scale":
            x = 1.0 + x
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, lnn.unbox(shapes))


@functools.cache
def _model(kind: str):
    """(model, params) of a tiny GPT ('gpt') or encoder-decoder ('transformer', 't5')."""
    ids = jnp.ones((1, 4), jnp.int32)
    if kind == "gpt":
        model = GPT(TINY_GPT)
        return model, random_params(model, ids)
    model = EncoderDecoder(TINY_S2S[kind])
    return model, random_params(model, ids, ids)


@functools.cache
def _full(kind: str):
    """A jitted full forward pass (no cache) with padding masks: GPT (params, ids, mask);
    encoder-decoders (params, src, src_mask, ids, mask). Positions count real tokens."""
    model, _ = _model(kind)
    if kind == "gpt":
        return jax.jit(
            lambda p, ids, m: model.apply(
                {"params": p},
                ids,
                positions=positions_from_mask(m),
                attention_mask=m,
                deterministic=True,
            )
        )
    return jax.jit(
        lambda p, src, src_mask, ids, m: model.apply(
            {"params": p}, src, ids, inputs_mask=src_mask, decoder_mask=m, deterministic=True
        )
    )


# Prompts of 4, 2 and 1 tokens (GPT) or decoder prefixes of 3, 1, 2 tokens after the start
# token 1 over encoder inputs of 5, 3 and 7 tokens (encoder-decoders).
PROMPTS = {"gpt": [[1, 5, 9, 4], [2, 7], [3]], "s2s": [[1, 8, 9], [1], [1, 30]]}
SOURCES = [[4, 9, 12, 3, 40], [7, 7, 20], [2, 3, 5, 8, 13, 21, 34]]
N = 6


def _inputs(kind: str, pad_token: int = 0) -> tuple[list, dict]:
    """(prompt rows, generate kwargs): left-padded prompts (and right-padded encoder inputs),
    with `pad_token` written into every padding slot."""
    rows = PROMPTS["gpt" if kind == "gpt" else "s2s"]
    ids, mask = decode.left_pad(rows, pad_id=pad_token)
    kw = dict(prompt=jnp.asarray(ids), prompt_mask=jnp.asarray(mask))
    if kind != "gpt":
        src = np.full((3, 7), pad_token, np.int32)
        src_mask = np.zeros((3, 7), np.int32)
        for b, r in enumerate(SOURCES):
            src[b, : len(r)], src_mask[b, : len(r)] = r, 1
        kw.update(encoder_inputs=jnp.asarray(src), encoder_mask=jnp.asarray(src_mask))
    return rows, kw


@functools.cache
def _greedy(kind: str, pad_token: int = 0):
    model, params = _model(kind)
    rows, kw = _inputs(kind, pad_token)
    out, seen = decode.generate(
        model,
        params,
        max_new_tokens=N,
        rng=jax.random.key(0),
        temperature=0.0,
        return_logits=True,
        **kw,
    )
    return rows, kw, np.asarray(out)[:, -N:], np.asarray(seen)


def _right_aligned(rows: list, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt followed by its new tokens at positions 0.., right-padded: no left padding."""
    L = max(len(r) for r in rows) + new.shape[1]
    ids, mask = np.zeros((len(rows), L), np.int32), np.zeros((len(rows), L), np.int32)
    for b, r in enumerate(rows):
        seq = [*r, *new[b].tolist()]
        ids[b, : len(seq)], mask[b, : len(seq)] = seq, 1
    return ids, mask


def _full_logits(kind: str, kw: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    _, params = _model(kind)
    if kind == "gpt":
        return np.asarray(_full(kind)(params, ids, mask))
    return np.asarray(_full(kind)(params, kw["encoder_inputs"], kw["encoder_mask"], ids, mask))


# ---------------------------------------------------------------------------------------------
# Cached decoding == full forward passes


@pytest.mark.parametrize("kind", ["gpt", "transformer", "t5"])
def test_cached_logits_equal_full_forward_at_every_step_with_padding(kind):
    """Greedy decoding of a batch with left-padded prompts (and right-padded encoder inputs):
    the logits every token was chosen from (prefill, then each cached step) equal a full
    forward pass over the padded batch, and over the rows without left padding; each token is
    their argmax; and what sits in the padding slots changes nothing."""
    rows, kw, new, seen = _greedy(kind)
    P = kw["prompt"].shape[1]
    mask = np.asarray(kw["prompt_mask"])
    ids = np.concatenate([np.asarray(kw["prompt"]), new], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    ref = _full_logits(kind, kw, ids, full_mask)
    np.testing.assert_allclose(seen, ref[:, P - 1 : P - 1 + N], atol=1e-5)
    np.testing.assert_array_equal(new, seen.argmax(-1))
    natural_ids, natural_mask = _right_aligned(rows, new)
    natural = _full_logits(kind, kw, natural_ids, natural_mask)
    for b, r in enumerate(rows):
        np.testing.assert_allclose(seen[b], natural[b, len(r) - 1 : len(r) - 1 + N], atol=1e-5)
    _, _, new2, seen2 = _greedy(kind, pad_token=17)  # garbage in every padding slot
    np.testing.assert_array_equal(new2, new)
    np.testing.assert_allclose(seen2, seen, atol=1e-5)


def test_cross_attention_keys_and_values_are_computed_once():
    """After the first decode call, cross-attention reads its cached keys/values: a different
    context changes nothing, and the cache holds the first context's projections. `init`
    (which sizes caches) stores none."""
    attn = lnn.MultiHeadAttention(num_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 1, 8))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 8))

    cache_shapes = jax.eval_shape(
        lambda: attn.init(jax.random.key(2), x, ctx, deterministic=True, decode=True)
    )
    assert "cache" not in cache_shapes
    params = {"params": random_params(attn, x, ctx)}

    @jax.jit
    def run(x, ctx):
        first, cache = attn.apply(
            params, x, ctx, deterministic=True, decode=True, mutable=["cache"]
        )
        again, _ = attn.apply(
            {**params, **cache},
            x,
            jnp.zeros((2, 1, 8)),
            deterministic=True,
            decode=True,
            mutable=["cache"],
        )
        plain = attn.apply(params, x, ctx, deterministic=True)
        return cache, first, again, plain

    cache, first, again, plain = run(x, ctx)
    p = params["params"]
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    want_k = np.einsum("BSD,DKH->BSKH", ctx, p["key"]["kernel"]) + p["key"]["bias"]
    np.testing.assert_allclose(np.asarray(cache["cache"]["cached_cross_key"]), want_k, atol=1e-5)
    np.testing.assert_allclose(np.asarray(first), np.asarray(plain), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    greedy = decode.sample_logits(logits, jax.random.key(1), temperature=0.0)
    for seed in range(5):
        np.testing.assert_array_equal(
            np.asarray(decode.sample_logits(logits, jax.random.key(seed), top_k=1)),
            np.asarray(greedy),
        )
    a = decode.sample_logits(logits, jax.random.key(2), temperature=1.0)
    b = decode.sample_logits(logits, jax.random.key(2), temperature=1.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    for seed in range(20):
        s = np.asarray(decode.sample_logits(logits, jax.random.key(seed), top_k=3))
        assert all(s[i] in top3[i] for i in range(4))


def test_top_p_keeps_exactly_the_smallest_set_reaching_p():
    # Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 (token order shuffled).
    probs = np.array([0.0625, 0.25, 0.5, 0.0625, 0.125])
    logits = jnp.asarray(np.log(probs), jnp.float32)[None]
    cases = {
        0.3: {2},  # 0.5 alone reaches 0.3
        0.5: {2},  # ... and exactly 0.5
        0.6: {2, 1},  # 0.5 < 0.6 <= 0.75
        0.75: {2, 1},
        0.8: {2, 1, 4},  # 0.75 < 0.8 <= 0.875
        0.9: {2, 1, 4, 0},  # 0.875 < 0.9 <= 0.9375: of the two tied 0.0625s, the first
        1.0: {0, 1, 2, 3, 4},
    }
    top_p = jax.jit(lambda logits, p: decode.filter_logits(logits, top_p=p))
    for p, want in cases.items():
        kept = np.flatnonzero(np.isfinite(np.asarray(top_p(logits, p)[0])))
        assert set(kept.tolist()) == want, (p, kept)
    # Random distributions against a float64 reference, p away from every boundary.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 30)) * 2
    pr = np.exp(x - x.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    p = 0.7
    got = np.isfinite(np.asarray(top_p(jnp.asarray(x, jnp.float32), p)))
    for row in range(64):
        order = np.argsort(-pr[row])
        cum = np.cumsum(pr[row][order])
        assert np.min(np.abs(cum - p)) > 1e-4  # no float32 ambiguity in this draw
        n = int(np.searchsorted(cum, p) + 1)  # the smallest prefix whose mass reaches p
        assert set(np.flatnonzero(got[row]).tolist()) == set(order[:n].tolist())
    # Sampling with top_p draws only from the kept set; tiny p is greedy.
    sample = jax.jit(decode.sample_logits, static_argnames=("top_p",))
    draws = [int(sample(logits, jax.random.key(seed), top_p=0.6)[0]) for seed in range(20)]
    assert set(draws) == {1, 2}
    tiny = sample(jnp.asarray(x, jnp.float32), jax.random.key(3), top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(tiny), x.argmax(-1))


# ---------------------------------------------------------------------------------------------
# Beam search


# Toy models: the next-token distribution depends only on the last token, logits = log P.
# Tokens: 0 pad, 1 EOS, 2 A, 3 B.
UNIFORM = [0.25] * 4


def _log(probs: Any) -> jax.Array:
    return jnp.log(jnp.asarray(probs, jnp.float32))


@functools.partial(
    jax.jit,
    static_argnames=("beam_size", "max_new_tokens", "eos_id", "alpha", "form", "early"),
)
def _toy_beam(
    first, table, *, beam_size, max_new_tokens, eos_id, alpha=0.0, form="gnmt", early=None
):
    """Beam search over first [B, V] logits and a [V, V] table of next-token logits."""
    state = {"rows": jnp.zeros((first.shape[0],), jnp.int32)}  # follows the beams
    return decode.beam_search_loop(
        lambda state, tokens: (table[tokens], state),
        state,
        first,
        beam_size=beam_size,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        length_penalty_alpha=alpha,
        length_penalty_form=form,
        early_stopping=early,
    )


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "eos_id"))
def _toy_greedy(first, table, *, max_new_tokens, eos_id):
    return decode.sample_loop(
        lambda state, tokens: (table[tokens], state),
        {},
        first,
        jax.random.key(0),
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        eos_id=eos_id,
    )


def test_beam_search_on_hand_set_distributions():
    """Start: A .5, B .3, EOS .2. After A: EOS .4, A .35, B .25. After B: EOS .9, A .05, B .05.
    Two beams, by hand (an EOS counts only among the two best candidates of a step):
      step 1: A .5, B .3 live (EOS .2 ranks third: dropped)
      step 2: B-EOS .27, A-EOS .20 finish; AA .175, AB .125 live. With alpha = 0 no live beam
              can beat .20 any more: stop after 2 of 4 steps.
    Greedy says A-EOS (.2); beam search returns B-EOS (.27) first."""
    first = _log([[0.0, 0.2, 0.5, 0.3]])
    table = _log([UNIFORM, UNIFORM, [0.0, 0.4, 0.35, 0.25], [0.0, 0.9, 0.05, 0.05]])
    out = _toy_beam(first, table, beam_size=2, max_new_tokens=4, eos_id=1, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(out.sequences[0]), [[3, 1, 0, 0], [2, 1, 0, 0]])
    np.testing.assert_allclose(
        np.asarray(out.scores[0]), [math.log(0.3 * 0.9), math.log(0.5 * 0.4)], rtol=1e-6
    )
    assert np.asarray(out.finished[0]).all() and int(out.steps) == 2
    np.testing.assert_array_equal(
        np.asarray(_toy_greedy(first, table, max_new_tokens=4, eos_id=1)), [[2, 1, 0, 0]]
    )
    # alpha = 1: scores are log P / ((5 + 2) / 6). After step 2 a live beam could still reach
    # log(.175) / ((5 + 4) / 6) = -1.16 > -1.38, so step 3 runs: AB-EOS .1125 and AA-EOS .07
    # finish at -1.64 and -1.99, below both; the live AAA (.06125) is bounded by -1.86: stop.
    out = _toy_beam(first, table, beam_size=2, max_new_tokens=4, eos_id=1, alpha=1.0)
    np.testing.assert_array_equal(np.asarray(out.sequences[0]), [[3, 1, 0, 0], [2, 1, 0, 0]])
    np.testing.assert_allclose(np.asarray(out.scores[0]), np.log([0.27, 0.2]) / (7 / 6), rtol=1e-6)
    assert int(out.steps) == 3


def test_transformers_early_stopping_rules_by_hand():
    """length_penalty_form='hf' (score = log P / tokens^alpha), alpha = 1, two beams.

    The distributions of the test above: step 1 keeps A .5, B .3; step 2 finishes B-EOS .27
    (-0.655) and A-EOS .2 (-0.805), AA .175 and AB .125 live. The row is full: True stops;
    False scores AA at its length, log(.175) / 2 = -0.872 < -0.805: stops too. 'never' bounds
    it at 4 tokens (-0.436) and goes on: step 3 finishes AB-EOS .1125 (-0.728), which replaces
    A-EOS; AAA .06125 still bounds at -0.698 > -0.728, so step 4 runs, the last: AAB-EOS
    .039375 (-0.808) and AAA-EOS .0245 finish at max length, neither good enough."""
    first = _log([[0.0, 0.2, 0.5, 0.3]])
    table = _log([UNIFORM, UNIFORM, [0.0, 0.4, 0.35, 0.25], [0.0, 0.9, 0.05, 0.05]])
    kw = dict(beam_size=2, max_new_tokens=4, eos_id=1, alpha=1.0, form="hf")
    for early in (True, False):
        out = _toy_beam(first, table, **kw, early=early)
        np.testing.assert_array_equal(np.asarray(out.sequences[0]), [[3, 1, 0, 0], [2, 1, 0, 0]])
        np.testing.assert_allclose(np.asarray(out.scores[0]), np.log([0.27, 0.2]) / 2, rtol=1e-6)
        assert int(out.steps) == 2
    out = _toy_beam(first, table, **kw, early="never")
    np.testing.assert_array_equal(np.asarray(out.sequences[0]), [[3, 1, 0, 0], [2, 3, 1, 0]])
    np.testing.assert_allclose(
        np.asarray(out.scores[0]), [np.log(0.27) / 2, np.log(0.1125) / 3], rtol=1e-6
    )
    assert int(out.steps) == 4
    # Start: EOS .5, A .45, B .05; after A: EOS .15, A .75, B .1; after B: EOS .6, A .2, B .2.
    # Step 1 finishes EOS (-0.693), keeps A; step 2 finishes A-EOS .0675 (-1.348): full, so
    # True stops with EOS, A-EOS. False: AA .3375 scores -0.543 at its length, better than
    # -1.348: on. Step 3 is the last: AAA .2531 finishes at max length with -0.458, the best.
    first = _log([[0.0, 0.5, 0.45, 0.05]])
    table = _log([UNIFORM, UNIFORM, [0.0, 0.15, 0.75, 0.1], [0.0, 0.6, 0.2, 0.2]])
    kw = dict(beam_size=2, max_new_tokens=3, eos_id=1, alpha=1.0, form="hf")
    out = _toy_beam(first, table, **kw, early=True)
    np.testing.assert_array_equal(np.asarray(out.sequences[0]), [[1, 0, 0], [2, 1, 0]])
    assert int(out.steps) == 2
    out = _toy_beam(first, table, **kw, early=False)
    np.testing.assert_array_equal(np.asarray(out.sequences[0]), [[2, 2, 2], [1, 0, 0]])
    np.testing.assert_allclose(
        np.asarray(out.scores[0]), [np.log(0.45 * 0.75 * 0.75) / 3, np.log(0.5)], rtol=1e-6
    )
    assert np.asarray(out.finished[0]).all() and int(out.steps) == 3  # cut at max length
    with pytest.raises(ValueError, match="early_stopping"):
        _toy_beam(first, table, **kw, early="sometimes")


def test_beam_search_stops_early_and_falls_back_to_live_beams():
    """Start: EOS .6, A .3, B .1; after A or B, EOS .9. Step 1 finishes EOS (.6); step 2
    finishes A-EOS (.27) and B-EOS (.09); now both finished beams beat every live one (AA, AB
    at .015), so the search stops after 2 of 10 steps with EOS and A-EOS."""
    first = _log([[0.0, 0.6, 0.3, 0.1]])
    table = _log([UNIFORM, UNIFORM, [0.0, 0.9, 0.05, 0.05], [0.0, 0.9, 0.05, 0.05]])
    out = _toy_beam(first, table, beam_size=2, max_new_tokens=10, eos_id=1)
    assert int(out.steps) == 2
    np.testing.assert_array_equal(np.asarray(out.sequences[0, :, :2]), [[1, 0], [2, 1]])
    np.testing.assert_allclose(np.asarray(out.scores[0]), np.log([0.6, 0.27]), rtol=1e-6)
    # Without an EOS nothing finishes: the live beams come back, scored at full length.
    # Step 1: EOS .6, A .3 live; step 2: A-EOS .27 beats the EOS-continuations (.15 each).
    out = _toy_beam(first, table, beam_size=2, max_new_tokens=3, eos_id=None)
    assert not np.asarray(out.finished).any() and int(out.steps) == 3
    np.testing.assert_array_equal(np.asarray(out.sequences[0]), [[2, 1, 0], [2, 1, 1]])
    np.testing.assert_allclose(
        np.asarray(out.scores[0]), np.log([0.3 * 0.9 * 0.25, 0.3 * 0.9 * 0.25]), rtol=1e-6
    )


def test_greedy_stops_each_row_at_eos_and_beam_size_one_is_greedy():
    """By hand: row 0 goes A (.5) -> B (.6) -> EOS (.7), row 1 B (.9) -> EOS (.7); then pads.
    On random Markov chains with an EOS, beam search with one beam returns exactly the greedy
    tokens, whether or not a row reaches EOS."""
    first = _log([[0.0, 0.1, 0.5, 0.4], [0.0, 0.05, 0.05, 0.9]])
    table = _log([UNIFORM, UNIFORM, [0.0, 0.1, 0.3, 0.6], [0.0, 0.7, 0.2, 0.1]])
    greedy = _toy_greedy(first, table, max_new_tokens=5, eos_id=1)
    np.testing.assert_array_equal(np.asarray(greedy), [[2, 3, 1, 0, 0], [3, 1, 0, 0, 0]])
    rng = np.random.default_rng(0)
    finished = []
    for _ in range(3):
        probs = rng.dirichlet(np.full(7, 0.5), size=7 + 8)
        table, first = _log(probs[:7]), _log(probs[7:])  # 8 rows
        greedy = _toy_greedy(first, table, max_new_tokens=12, eos_id=1)
        beam = _toy_beam(first, table, beam_size=1, max_new_tokens=12, eos_id=1)
        np.testing.assert_array_equal(np.asarray(beam.sequences[:, 0]), np.asarray(greedy))
        finished += np.asarray(beam.finished[:, 0]).tolist()
    assert any(finished) and not all(finished), "rows both with and without EOS were tested"


@pytest.mark.parametrize("kind", ["gpt", "t5"])
def test_beam_scores_are_full_forward_log_probabilities(kind):
    """Beam search (3 beams, length penalty 0.6) over the padded batch: every returned beam's
    score is its log-probability under a full forward pass (no cache) divided by the length
    penalty, so cache rows followed their beams; finished beams come first, best first."""
    rows, kw, greedy, _ = _greedy(kind)
    eos = int(greedy[0, 2])  # row 0's greedy path ends there, so something finishes
    model, params = _model(kind)
    alpha = 0.6
    out = decode.beam_search(
        model,
        params,
        beam_size=3,
        max_new_tokens=N,
        eos_id=eos,
        length_penalty=alpha,
        **kw,
    )
    seqs, scores, finished = (np.asarray(x) for x in out[:3])
    assert finished.any()
    for w in range(3):
        ids, mask = _right_aligned(rows, seqs[:, w])
        logp = np.asarray(jax.nn.log_softmax(_full_logits(kind, kw, ids, mask)))
        for b, r in enumerate(rows):
            kept = decode.until_eos(seqs[b, w], eos)
            n = len(kept) + 1 if finished[b, w] else N
            total = sum(logp[b, len(r) - 1 + t, seqs[b, w, t]] for t in range(n))
            length = n if finished[b, w] else int(out.steps)
            want = total / float(decode.length_penalty(length, alpha))
            np.testing.assert_allclose(scores[b, w], want, rtol=1e-5, err_msg=f"row {b} beam {w}")
    for b in range(3):
        k = int(finished[b].sum())
        assert finished[b, :k].all() and (np.diff(scores[b, :k]) <= 0).all()


# ---------------------------------------------------------------------------------------------
# Under a mesh

_MESH_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from lmflax import decode, nn as lnn
    from lmflax.config import MeshConfig, DEFAULT_RULES
    from lmflax.models import PRESETS, EncoderDecoder
    from lmflax.parallel import logical_shardings, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2))
    rules = list(DEFAULT_RULES)
    small = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, scan_layers=True)
    model = EncoderDecoder(dataclasses.replace(PRESETS["t5_tiny"], **small))
    ids = jnp.ones((2, 4), jnp.int32)
    init = lambda: model.init(jax.random.key(0), ids, ids, deterministic=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init)["params"]
    shardings = logical_shardings(boxed, mesh, rules)
    rng = np.random.default_rng(0)  # NumPy weights: no init to compile
    plain = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), lnn.unbox(boxed))
    sharded = jax.device_put(plain, shardings)
    src = jnp.array([[4, 9, 12, 3], [7, 7, 0, 0]])
    prompt, mask = decode.left_pad([[1, 5, 9], [1]])

    def run(params):
        out = decode.beam_search(
            model, params, jnp.asarray(prompt), prompt_mask=jnp.asarray(mask), beam_size=2,
            max_new_tokens=5, eos_id=3, encoder_inputs=src, encoder_mask=(src > 0).astype(int),
        )
        return np.asarray(out.sequences).tolist(), np.asarray(out.scores).tolist()

    single = run(plain)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        meshed = run(sharded)
    specs = sorted({str(s.spec) for s in jax.tree.leaves(shardings)})
    print("RESULT " + json.dumps(dict(single=single, meshed=meshed, specs=specs)))
    """
)


@pytest.mark.slow
def test_decoding_under_a_sharded_mesh_matches_one_device(tmp_path):
    """4 fake CPU devices as data=2 × tensor=2: with the parameters sharded by their logical
    axes (heads, vocabulary and MLP over `tensor`) and the batch over `data`, beam search over
    an encoder-decoder with padded prompts gives the one-device beams and scores."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT ") :])
    assert any("tensor" in spec for spec in r["specs"]), r["specs"]
    assert r["meshed"][0] == r["single"][0]
    np.testing.assert_allclose(r["meshed"][1], r["single"][1], atol=1e-5)
