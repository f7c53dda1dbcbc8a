"""BartForConditionalGeneration and MarianMTModel against transformers (PyTorch, CPU): tiny random
models that transformers initialises and saves load into lmflax with the same logits on padded
batches, lmflax's export loads back into transformers, and greedy / beam search give the tokens
`generate` gives (with each model's decoder start and forced tokens). Nothing is downloaded."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmflax
from lmflax import decode
from lmflax.hf import CheckpointError
from lmflax.models import EncoderDecoder

TOL = 1e-4
V = 71
PAD = 1
COMMON = dict(
    vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40,
    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD, bos_token_id=0,
    eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
)  # fmt: skip
TINY = {
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(COMMON)),
    "bart_scaled_relu": (
        "BartConfig",
        "BartForConditionalGeneration",
        dict(COMMON, scale_embedding=True, activation_function="relu", decoder_layers=3),
    ),
    # Marian's decoder starts from the pad token.
    "marian": (
        "MarianConfig",
        "MarianMTModel",
        dict(COMMON, decoder_start_token_id=PAD, activation_function="swish"),
    ),
}
SOURCES = [[0, 5, 9, 17, 3, 44, 8, 2], [0, 12, 7, 2], [0, 30, 31, 32, 33, 2]]
TARGETS = [[4, 8, 15, 16], [23, 42], [7, 7, 9]]  # after the decoder start token
NEW = 6


def _right_pad(rows, pad=PAD):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def torch():
    import torch

    torch.set_grad_enabled(False)
    return torch


@pytest.fixture(scope="module")
def transformers(torch):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, torch, transformers):
    """name -> (saved directory, the transformers model in eval mode)."""
    out = {}
    for i, (name, (config_cls, model_cls, kwargs)) in enumerate(TINY.items()):
        torch.manual_seed(i)
        config = getattr(transformers, config_cls)(**kwargs)
        model = getattr(transformers, model_cls)(config).eval()
        # Random init leaves final_logits_bias at zero; make it matter.
        model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


def _start(name):
    return TINY[name][2]["decoder_start_token_id"]


def _batch(name):
    src, src_mask = _right_pad(SOURCES)
    tgt, tgt_mask = _right_pad([[_start(name), *t] for t in TARGETS])
    return src, src_mask, tgt, tgt_mask


def _hf_logits(torch, model, src, src_mask, tgt, tgt_mask):
    return model(
        input_ids=torch.tensor(src, dtype=torch.long),
        attention_mask=torch.tensor(src_mask, dtype=torch.long),
        decoder_input_ids=torch.tensor(tgt, dtype=torch.long),
        decoder_attention_mask=torch.tensor(tgt_mask, dtype=torch.long),
    ).logits.numpy()


def _lmflax_logits(model, params, src, src_mask, tgt, tgt_mask):
    return np.asarray(
        model.apply(
            {"params": params},
            jnp.asarray(src),
            jnp.asarray(tgt),
            inputs_mask=jnp.asarray(src_mask),
            decoder_mask=jnp.asarray(tgt_mask),
            deterministic=True,
        )
    )


@pytest.mark.parametrize("name", list(TINY))
def test_logits_match_transformers_on_padded_batches(name, tiny, torch):
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    assert isinstance(model, EncoderDecoder)
    batch = _batch(name)
    want = _hf_logits(torch, ref, *batch)
    got = _lmflax_logits(model, params, *batch)
    real = batch[3].astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", list(TINY))
def test_export_loads_back_into_transformers(name, tiny, torch, transformers, tmp_path):
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    out = lmflax.save_pretrained(model.config, params, tmp_path / "export")
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    assert arch == TINY[name][1]
    back = getattr(transformers, arch).from_pretrained(out).eval()
    batch = _batch(name)
    np.testing.assert_allclose(
        _hf_logits(torch, back, *batch), _hf_logits(torch, ref, *batch), atol=TOL, rtol=TOL
    )


def _hf_generate(torch, model, name, **kwargs):
    src, src_mask = _right_pad(SOURCES)
    out = model.generate(
        input_ids=torch.tensor(src, dtype=torch.long),
        attention_mask=torch.tensor(src_mask, dtype=torch.long),
        max_new_tokens=NEW,
        decoder_start_token_id=_start(name),
        pad_token_id=PAD,
        do_sample=False,
        **kwargs,
    ).numpy()[:, 1:]
    full = np.full((len(SOURCES), NEW), PAD, np.int64)
    full[:, : out.shape[1]] = out
    eos = kwargs.get("eos_token_id")
    if eos is not None:  # what follows a row's EOS is padding (transformers' beams repeat EOS)
        for row in full:
            hits = np.flatnonzero(row == eos)
            if hits.size:
                row[hits[0] + 1 :] = PAD
    return full


def _eos_for(torch, model, name):
    """An EOS that greedy decoding produces somewhere (so that stopping is exercised)."""
    tokens = _hf_generate(torch, model, name, eos_token_id=None, num_beams=1)
    counts = np.bincount(tokens.ravel(), minlength=V)
    counts[PAD] = 0
    return int(counts.argmax())


@pytest.mark.parametrize("name", ["bart", "marian"])
def test_greedy_equals_transformers_generate(name, tiny, torch):
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    eos = _eos_for(torch, ref, name)
    want = _hf_generate(torch, ref, name, eos_token_id=eos, num_beams=1)
    src, src_mask = _right_pad(SOURCES)
    out = decode.generate(
        model,
        params,
        jnp.full((len(SOURCES), 1), _start(name), jnp.int32),
        encoder_inputs=jnp.asarray(src),
        encoder_mask=jnp.asarray(src_mask),
        max_new_tokens=NEW,
        rng=jax.random.key(0),
        temperature=0.0,
        eos_id=eos,
        pad_id=PAD,
    )
    np.testing.assert_array_equal(np.asarray(out)[:, 1:], want)


@pytest.mark.parametrize("name", ["bart", "marian"])
def test_beam_search_equals_transformers_generate(name, tiny, torch):
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    eos = _eos_for(torch, ref, name)
    want = _hf_generate(
        torch, ref, name, eos_token_id=eos, num_beams=3, length_penalty=1.2, early_stopping=True
    )
    src, src_mask = _right_pad(SOURCES)
    out = decode.beam_search(
        model,
        params,
        jnp.full((len(SOURCES), 1), _start(name), jnp.int32),
        encoder_inputs=jnp.asarray(src),
        encoder_mask=jnp.asarray(src_mask),
        beam_size=3,
        max_new_tokens=NEW,
        eos_id=eos,
        pad_id=PAD,
        length_penalty=1.2,
        length_penalty_form="hf",
        early_stopping=True,
    )
    np.testing.assert_array_equal(np.asarray(out.sequences[:, 0]), want)


@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("bart", {"normalize_before": True}, "pre-norm"),
        ("bart", {"decoder_ffn_dim": 64}, "decoder_ffn_dim"),
        ("marian", {"share_encoder_decoder_embeddings": False}, "share_encoder_decoder"),
        ("marian", {"activation_function": "mish"}, "activation_function='mish'"),
    ],
)
def test_unsupported_settings_are_refused_by_name(name, change, match, tiny, tmp_path):
    import shutil

    path, _ = tiny[name]
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=match):
        lmflax.from_pretrained(tmp_path)


def _lmflax_tokens(model, params, name, beams, eos, constraints, *, length_penalty):
    """lmflax's new tokens [B, NEW] for SOURCES: greedy (beams 1) or transformers-rule beam
    search with early_stopping=True, under `constraints`."""
    src, src_mask = _right_pad(SOURCES)
    common = dict(
        encoder_inputs=jnp.asarray(src),
        encoder_mask=jnp.asarray(src_mask),
        max_new_tokens=NEW,
        eos_id=eos,
        pad_id=PAD,
        constraints=constraints,
    )
    start = jnp.full((len(SOURCES), 1), _start(name), jnp.int32)
    if beams == 1:
        out = decode.generate(
            model, params, start, rng=jax.random.key(0), temperature=0.0, **common
        )
        return np.asarray(out)[:, 1:]
    out = decode.beam_search(
        model, params, start, beam_size=beams, length_penalty=length_penalty,
        length_penalty_form="hf", early_stopping=True, **common,
    )  # fmt: skip
    return np.asarray(out.sequences[:, 0])


@pytest.mark.parametrize(
    ("name", "beams"), [("bart", 1), ("bart", 3), ("marian", 1), ("marian", 3)]
)
def test_forced_and_banned_tokens_equal_transformers_generate(name, beams, tiny, torch):
    """BART's forced_bos_token_id / forced_eos_token_id and Marian's bad_words_ids=[[pad]]
    (+ a token the model would choose, + forced EOS): lmflax.decode's Constraints give
    generate's tokens, greedy and beam, and they change what is generated."""
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    # These random models repeat one token (`free`); forcing and banning must move them off it.
    beam = {"length_penalty": 1.2, "early_stopping": True} if beams > 1 else {}
    free = _hf_generate(torch, ref, name, eos_token_id=None, num_beams=beams, **beam)
    eos = int(next(t for t in range(3, V) if t not in free))
    hf_kwargs = {"forced_eos_token_id": eos}
    if name == "bart":
        forced_bos = int(next(t for t in range(eos + 1, V) if t not in free))
        banned = ()
        hf_kwargs["forced_bos_token_id"] = forced_bos
    else:
        # (transformers never bans the EOS itself: it drops it from bad_words_ids.)
        forced_bos, banned = None, (PAD, *sorted({int(t) for t in free[:, 0]}))
        hf_kwargs["bad_words_ids"] = [[t] for t in banned]
    want = _hf_generate(torch, ref, name, eos_token_id=eos, num_beams=beams, **beam, **hf_kwargs)
    assert not np.array_equal(want, free), "the constraints must change the output"
    constraints = decode.Constraints(forced_bos_id=forced_bos, forced_eos_id=eos, banned_ids=banned)
    got = _lmflax_tokens(model, params, name, beams, eos, constraints, length_penalty=1.2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("name", "beams"), [("bart", 1), ("bart", 3), ("marian", 3)])
def test_min_length_and_no_repeat_ngram_equal_transformers_generate(name, beams, tiny, torch):
    """transformers' min_length (counting the decoder start) and no_repeat_ngram_size (over the
    decoder start and the new tokens) = Constraints(min_new_tokens=min_length - 1,
    no_repeat_ngram_size=n), greedy and beam; both change what these random models say."""
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    beam = {"length_penalty": 1.0, "early_stopping": True} if beams > 1 else {}
    free = _hf_generate(torch, ref, name, eos_token_id=None, num_beams=beams, **beam)
    eos = int(free[0, 1])  # a token said early: min_length must hold it back
    plain = _hf_generate(torch, ref, name, eos_token_id=eos, num_beams=beams, **beam)
    want = _hf_generate(
        torch, ref, name, eos_token_id=eos, num_beams=beams, min_length=4,
        no_repeat_ngram_size=2, **beam,
    )  # fmt: skip
    assert not np.array_equal(want, plain), "the constraints must change the output"
    constraints = decode.Constraints(min_new_tokens=3, no_repeat_ngram_size=2)
    got = _lmflax_tokens(model, params, name, beams, eos, constraints, length_penalty=1.0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("name", "beams", "kind", "penalty"),
    [
        ("bart", 1, "repetition_penalty", 2.0),
        ("marian", 3, "repetition_penalty", 2.0),
        ("bart", 1, "encoder_repetition_penalty", 3.0),
        ("marian", 3, "encoder_repetition_penalty", 3.0),
        ("bart", 3, "encoder_repetition_penalty", 0.5),
    ],
)
def test_repetition_penalties_equal_transformers_generate(name, beams, kind, penalty, tiny, torch):
    """transformers' repetition_penalty (over the decoder start and the new tokens) and
    encoder_repetition_penalty (over the right-padded source, pads included) on an
    encoder-decoder = Constraints(...=p), greedy and beam; each changes what the model says."""
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    beam = {"length_penalty": 1.0, "early_stopping": True} if beams > 1 else {}
    penalized = dict(num_beams=beams, **{kind: penalty}, **beam)
    free = _hf_generate(torch, ref, name, eos_token_id=None, **penalized)
    eos = int(free[0, 3])  # said a few steps in under the penalty, so stopping is exercised
    plain = _hf_generate(torch, ref, name, eos_token_id=eos, num_beams=beams, **beam)
    want = _hf_generate(torch, ref, name, eos_token_id=eos, **penalized)
    assert not np.array_equal(want, plain), "the penalty must change the output"
    constraints = decode.Constraints(**{kind: penalty})
    got = _lmflax_tokens(model, params, name, beams, eos, constraints, length_penalty=1.0)
    np.testing.assert_array_equal(got, want)


def test_repeated_ngram_tokens_against_a_loop():
    """repeated_ngram_tokens = the n-grams written out in Python (as the processor's docs
    define them), on random short histories with repeats, every length and n."""
    rng = np.random.default_rng(0)
    V_ = 5
    hist = rng.integers(0, 3, size=(4, 9)).astype(np.int32)
    for n in (1, 2, 3):
        for length in range(hist.shape[1] + 1):
            got = np.asarray(decode.repeated_ngram_tokens(jnp.asarray(hist), length, n, V_))
            want = np.zeros((4, V_), bool)
            for r in range(4):
                seq = hist[r, :length].tolist()
                if len(seq) + 1 < n:
                    continue
                tail = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
                for j in range(len(seq) - n + 1):
                    if tuple(seq[j : j + n - 1]) == tail:
                        want[r, seq[j + n - 1]] = True
            np.testing.assert_array_equal(got, want, err_msg=f"n={n} length={length}")
