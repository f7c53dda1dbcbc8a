"""T5ForConditionalGeneration (v1.0: relu, tied and scaled output; v1.1: gated GELU, untied)
against transformers (PyTorch, CPU): tiny random models that transformers initialises and saves
load into lmflax with the same logits on padded batches, lmflax's export loads back into
transformers, and greedy / beam search give the tokens `generate` gives. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
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
V = 83
TINY = {
    # T5 v1.0: relu feed-forward, output tied to the shared embedding and scaled by D^-1/2.
    "t5_v1_0": dict(
        vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="relu", tie_word_embeddings=True,
    ),
    # T5 v1.1 / Flan: GeGLU, no output scaling, d_kv * heads != d_model.
    "t5_v1_1": dict(
        vocab_size=V, d_model=32, d_kv=12, d_ff=40, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    ),
    # A deeper decoder than encoder (transformers' generate cannot run this one: its cache is
    # sized by num_layers), gated SiLU.
    "t5_deeper_decoder": dict(
        vocab_size=V, d_model=24, d_kv=8, d_ff=40, num_layers=1, num_decoder_layers=3,
        num_heads=2, relative_attention_num_buckets=6, relative_attention_max_distance=12,
        feed_forward_proj="gated-silu", tie_word_embeddings=False,
    ),
}  # fmt: skip
GENERATES = ["t5_v1_0", "t5_v1_1"]
SOURCES = [[5, 9, 17, 3, 44, 8, 1], [12, 7, 1], [30, 31, 32, 33, 1]]
TARGETS = [[0, 4, 8, 15, 16], [0, 23, 42], [0, 7, 7, 9]]  # decoder inputs, starting with 0
NEW = 7


def _right_pad(rows):
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
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
    for i, (name, kwargs) in enumerate(TINY.items()):
        torch.manual_seed(i)
        config = transformers.T5Config(**kwargs, dropout_rate=0.0, decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration(config).eval()
        # Random init leaves the relative bias near zero; make it matter.
        for module in (model.encoder, model.decoder):
            bias = module.block[0].layer[0].SelfAttention.relative_attention_bias.weight
            bias.copy_(torch.randn_like(bias))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


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
    src, src_mask = _right_pad(SOURCES)
    tgt, tgt_mask = _right_pad(TARGETS)
    want = _hf_logits(torch, ref, src, src_mask, tgt, tgt_mask)
    got = _lmflax_logits(model, params, src, src_mask, tgt, tgt_mask)
    real = tgt_mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", list(TINY))
def test_export_loads_back_into_transformers(name, tiny, torch, transformers, tmp_path):
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    out = lmflax.save_pretrained(model.config, params, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "T5ForConditionalGeneration"
    ]
    back = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    src, src_mask = _right_pad(SOURCES)
    tgt, tgt_mask = _right_pad(TARGETS)
    want = _hf_logits(torch, ref, src, src_mask, tgt, tgt_mask)
    got = _hf_logits(torch, back, src, src_mask, tgt, tgt_mask)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def _hf_generate(torch, model, **kwargs):
    src, src_mask = _right_pad(SOURCES)
    out = model.generate(
        input_ids=torch.tensor(src, dtype=torch.long),
        attention_mask=torch.tensor(src_mask, dtype=torch.long),
        max_new_tokens=NEW,
        decoder_start_token_id=0,
        pad_token_id=0,
        do_sample=False,
        **kwargs,
    ).numpy()[:, 1:]
    full = np.zeros((len(SOURCES), NEW), np.int64)
    full[:, : out.shape[1]] = out
    eos = kwargs.get("eos_token_id")
    if eos is not None:  # what follows a row's EOS is padding (transformers' beams repeat EOS)
        for row in full:
            hits = np.flatnonzero(row == eos)
            if hits.size:
                row[hits[0] + 1 :] = 0
    return full


def _eos_for(torch, model):
    """An EOS that greedy decoding produces somewhere (so that stopping is exercised)."""
    tokens = _hf_generate(torch, model, eos_token_id=None, num_beams=1)
    counts = np.bincount(tokens.ravel(), minlength=V)
    counts[0] = 0
    return int(counts.argmax())


@pytest.mark.parametrize("name", GENERATES)
def test_greedy_equals_transformers_generate(name, tiny, torch):
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    eos = _eos_for(torch, ref)
    want = _hf_generate(torch, ref, eos_token_id=eos, num_beams=1)
    src, src_mask = _right_pad(SOURCES)
    start = jnp.zeros((len(SOURCES), 1), jnp.int32)
    out = decode.generate(
        model,
        params,
        start,
        encoder_inputs=jnp.asarray(src),
        encoder_mask=jnp.asarray(src_mask),
        max_new_tokens=NEW,
        rng=jax.random.key(0),
        temperature=0.0,
        eos_id=eos,
        pad_id=0,
    )
    np.testing.assert_array_equal(np.asarray(out)[:, 1:], want)


@pytest.mark.parametrize(("beams", "alpha", "early"), [(3, 1.5, True), (2, 0.8, False)])
def test_beam_search_equals_transformers_generate(beams, alpha, early, tiny, torch):
    path, ref = tiny["t5_v1_1"]
    model, params = lmflax.from_pretrained(path)
    eos = _eos_for(torch, ref)
    want = _hf_generate(
        torch, ref, eos_token_id=eos, num_beams=beams, length_penalty=alpha, early_stopping=early
    )
    src, src_mask = _right_pad(SOURCES)
    out = decode.beam_search(
        model,
        params,
        jnp.zeros((len(SOURCES), 1), jnp.int32),
        encoder_inputs=jnp.asarray(src),
        encoder_mask=jnp.asarray(src_mask),
        beam_size=beams,
        max_new_tokens=NEW,
        eos_id=eos,
        pad_id=0,
        length_penalty=alpha,
        length_penalty_form="hf",
        early_stopping=early,
    )
    np.testing.assert_array_equal(np.asarray(out.sequences[:, 0]), want)


def test_unsupported_t5_settings_are_refused_before_reading_weights(tiny, tmp_path, monkeypatch):
    import shutil

    from lmflax.hf.files import WeightSource

    path, _ = tiny["t5_v1_0"]
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "gated-tanh"}))
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")

    def no_reads(self, name):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(WeightSource, "__getitem__", no_reads)
    with pytest.raises(CheckpointError, match="feed_forward_proj='gated-tanh'"):
        lmflax.from_pretrained(tmp_path)


def test_a_non_t5_encoder_decoder_is_refused_on_export(tmp_path):
    from lmflax.models.seq2seq import PRESETS

    cfg = dataclasses.replace(PRESETS["transformer_tiny"], num_layers=1)
    model = EncoderDecoder(cfg)
    ids = jnp.zeros((1, 2), jnp.int32)
    params = model.init(jax.random.key(0), ids, ids, deterministic=True)["params"]
    with pytest.raises(CheckpointError, match="seq2seq"):
        lmflax.save_pretrained(cfg, params, tmp_path / "x")


def test_an_untied_output_layer_round_trips(tiny, torch, transformers, tmp_path):
    """A T5 v1.1 checkpoint as published (its own lm_head.weight, tie_word_embeddings=False):
    lmflax loads it untied and exports it so that transformers loads the same head."""
    from safetensors.numpy import load_file, save_file

    path, _ = tiny["t5_v1_1"]
    old = tmp_path / "old_style"
    old.mkdir()
    tensors = load_file(path / "model.safetensors")
    head = np.random.default_rng(0).standard_normal((V, 32)).astype(np.float32)
    save_file({**tensors, "lm_head.weight": head}, old / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("scale_decoder_outputs", None)
    (old / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    model, params = lmflax.from_pretrained(old)
    assert not model.config.tie_embeddings and not model.config.scale_logits
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), head.T)
    ref_old = transformers.T5ForConditionalGeneration.from_pretrained(old).eval()
    src, src_mask = _right_pad(SOURCES)
    tgt, tgt_mask = _right_pad(TARGETS)
    want = _hf_logits(torch, ref_old, src, src_mask, tgt, tgt_mask)
    got = _lmflax_logits(model, params, src, src_mask, tgt, tgt_mask)
    real = tgt_mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=TOL)
    out = lmflax.save_pretrained(model.config, params, tmp_path / "export")
    back = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    again = _hf_logits(torch, back, src, src_mask, tgt, tgt_mask)
    np.testing.assert_allclose(again, want, atol=TOL, rtol=TOL)


def test_model_from_a_t5_directory_and_init_from(tiny):
    from lmflax import hf
    from lmflax.config import model_by_name
    from lmflax.models.seq2seq import Seq2SeqConfig

    path, _ = tiny["t5_v1_1"]
    cfg = model_by_name("model", f"hf:{path}")
    assert isinstance(cfg, Seq2SeqConfig) and cfg.init_from == f"hf:{path.resolve()}"
    assert cfg.activation == "geglu" and cfg.position == "relative"
    assert hf.check_init_from(cfg) == []
    wrong = dataclasses.replace(cfg, relative_buckets=16)
    assert any("relative_buckets" in e for e in hf.check_init_from(wrong))


def test_a_t5_style_sentencepiece_tokenizer_json_matches_transformers(tmp_path, transformers):
    """A Unigram (SentencePiece) tokenizer.json with '▁' word marks and '</s>' appended, as T5's:
    lmflax's tokenizer gives transformers' ids and decoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [
        "translate English to German: the house is wonderful.",
        "summarize: studies have shown that owning a dog is good for you",
        "the quick brown fox jumps over the lazy dog",
    ] * 20
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        corpus,
        trainers.UnigramTrainer(
            vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "T5Tokenizer",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            }
        )
    )
    ours = lmflax.load_tokenizer(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["translate English to German: the dog is quick.", "summarize: a fox, a house"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"]
        assert ids[-1] == 1  # '</s>'
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    batch = ours(texts)
    want = ref(texts, padding=True)
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(
        np.asarray(batch["attention_mask"]), np.asarray(want["attention_mask"])
    )
