"""Fine-tuning pretrained encoder-decoders as transformers does: Marian's sentencepiece tokenizer
gives transformers.MarianTokenizer's ids and text, the seq2seq batches are transformers'
labels / shift_tokens_right with the same loss, the finetune configs built from a checkpoint
directory decode as `generate` does (decoder start, forced and banned tokens, beams), and their
`:tiny` variants train and evaluate end to end on mocked TFDS data. Nothing is downloaded."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmflax
from lmflax.config import load_config_file, override
from lmflax.data import seq2seq as s2s_data
from lmflax.data.marian_tokenizer import MarianTokenizer
from lmflax.tasks.seq2seq import seq2seq_loss
from lmflax.train import resolve

RO = [
    "casa",
    "este",
    "minunată",
    "copilul",
    "citește",
    "o",
    "carte",
    "frumoasă",
    "în",
    "grădină",
    "mâine",
    "vom",
    "merge",
    "la",
    "mare",
    "și",
    "ne",
    "bucura",
    "de",
    "soare",
    "orașul",
    "vechi",
    "are",
    "străzi",
    "înguste",
]
EN = [
    "the",
    "house",
    "is",
    "wonderful",
    "child",
    "reads",
    "a",
    "beautiful",
    "book",
    "in",
    "garden",
    "tomorrow",
    "we",
    "will",
    "go",
    "to",
    "sea",
    "and",
    "enjoy",
    "sun",
    "old",
    "town",
    "has",
    "narrow",
    "streets",
]
# Sentences of our own, not in the tokenizers' training text: an unseen character (Ω), digits,
# a language code, an empty string, a long sentence that truncation cuts.
SOURCES = [
    "Copilul citește o carte frumoasă în grădină!",
    "Mâine vom merge la mare, și ne vom bucura de soare.",
    "Orașul vechi are 3 străzi Ωnguste?",
    ">>en<< Casa este minunată.",
    "",
    " ".join(RO * 3),
]
TARGETS = [
    "The child reads a beautiful book in the garden!",
    "Tomorrow we will go to the sea, and enjoy the sun.",
    "The old town has 3 narrow Ωstreets?",
    "The house is wonderful.",
    "",
    " ".join(EN * 3),
]


def _sentences(words, n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        out.append(line.capitalize() + rng.choice([".", "!", "?", ","]))
    return out


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


def _train_spm(lines, size):
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=size, model_type="unigram",
        character_coverage=1.0, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    return buf.getvalue()


def _tiny_model(torch, transformers, config_cls, model_cls, path, **kwargs):
    generation = {
        k: kwargs.pop(k)
        for k in ("forced_bos_token_id", "forced_eos_token_id", "bad_words_ids", "num_beams")
        if k in kwargs
    }
    config = getattr(transformers, config_cls)(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        **kwargs,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    # Random init leaves final_logits_bias at zero; make it matter.
    model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias))
    gen = model.generation_config
    for key, value in {**generation, "max_length": 12, "early_stopping": True}.items():
        setattr(gen, key, value)
    gen.decoder_start_token_id = kwargs["decoder_start_token_id"]
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def marian(tmp_path_factory, torch, transformers):
    """(directory, transformers MarianTokenizer, MarianMTModel): sentencepiece models trained
    here on Romanian-like and English-like sentences, a vocab.json of both sides' pieces (less
    three target pieces, which must then become <unk>), </s> = 0, <pad> last."""
    import sentencepiece

    path = tmp_path_factory.mktemp("marian")
    src = _train_spm(_sentences(RO, 300, 0), 90)
    tgt = _train_spm(_sentences(EN, 300, 1), 80)
    (path / "source.spm").write_bytes(src)
    (path / "target.spm").write_bytes(tgt)
    pieces = []
    for proto in (src, tgt):
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        pieces += [
            sp.id_to_piece(i)
            for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i))
        ]
    dropped = {"▁garden", "▁streets", "▁wonderful"}
    pieces = [p for p in dict.fromkeys(pieces) if p not in dropped]
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    vocab["<pad>"] = pad = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    tok = transformers.MarianTokenizer(
        str(path / "source.spm"), str(path / "target.spm"), str(path / "vocab.json")
    )
    tok.save_pretrained(path)
    model = _tiny_model(
        torch, transformers, "MarianConfig", "MarianMTModel", path, vocab_size=len(vocab),
        decoder_vocab_size=len(vocab), activation_function="swish", scale_embedding=True,
        pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad, forced_eos_token_id=0,
        bad_words_ids=[[pad]], num_beams=2,
    )  # fmt: skip
    return path, tok, model


@pytest.fixture(scope="module")
def bart(tmp_path_factory, torch, transformers):
    """(directory, transformers tokenizer, BartForConditionalGeneration): a byte-level BPE
    tokenizer.json trained here with BART's <s> <pad> </s> <unk> <mask> = 0-4 and its
    post-processor (<s> text </s>)."""
    import tokenizers
    from tokenizers import processors

    path = tmp_path_factory.mktemp("bart")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _sentences(EN, 300, 2),
        vocab_size=300,
        min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    bpe.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BartTokenizer", "model_max_length": 64})
    )
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = _tiny_model(
        torch, transformers, "BartConfig", "BartForConditionalGeneration", path,
        vocab_size=bpe.get_vocab_size(), pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2, num_beams=2,
    )  # fmt: skip
    return path, tok, model


# ---------------------------------------------------------------------------------------------
# Marian's tokenizer


def test_marian_tokenizer_gives_transformers_ids_and_text(marian):
    path, ref, _ = marian
    tok = lmflax.load_tokenizer(path)
    assert isinstance(tok, MarianTokenizer)
    assert (tok.pad_token_id, tok.eos_token_id, tok.vocab_size) == (
        ref.pad_token_id,
        ref.eos_token_id,
        len(ref),
    )
    unk = tok.token_id("unk_token")
    for src, tgt in zip(SOURCES, TARGETS, strict=True):
        assert tok.encode(src) == ref(src)["input_ids"], src
        want = ref(text_target=tgt)["input_ids"]
        assert tok.encode(tgt, target=True) == want, tgt
        for length in (3, 8):
            cut = ref(src, max_length=length, truncation=True)["input_ids"]
            assert tok.encode(src, max_length=length) == cut
        for skip in (True, False):
            text = ref.decode(want, skip_special_tokens=skip, use_source_tokenizer=False)
            assert tok.decode(want, skip_special_tokens=skip) == text
            ids = ref(src)["input_ids"]
            text = ref.decode(ids, skip_special_tokens=skip, use_source_tokenizer=True)
            assert tok.decode(ids, skip_special_tokens=skip, target=False) == text
    # The pieces vocab.json lacks, and Ω, are <unk>; the target side cuts with target.spm.
    assert unk in tok.encode(TARGETS[0], target=True) and unk in tok.encode(SOURCES[2])
    assert tok.encode(TARGETS[1], target=True) != tok.encode(TARGETS[1])


def test_marian_tokenizer_saves_what_transformers_loads(marian, tmp_path, transformers):
    path, ref, _ = marian
    lmflax.load_tokenizer(path).save(tmp_path)
    back = transformers.MarianTokenizer.from_pretrained(tmp_path)
    for text in SOURCES:
        assert back(text)["input_ids"] == ref(text)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Batches and loss


@pytest.mark.parametrize("family", ["marian", "bart"])
def test_batches_and_loss_are_transformers_labels_and_loss(family, marian, bart, torch):
    """lmflax's seq2seq examples from the checkpoint's tokenizer and decoder start are exactly
    transformers' input_ids / labels (-100 = weight 0) / shift_tokens_right(labels), and the
    loss of the batch is `model(input_ids, attention_mask, labels=labels).loss`."""
    path, ref, hf_model = {"marian": marian, "bart": bart}[family]
    from transformers.models.bart.modeling_bart import shift_tokens_right

    settings = lmflax.hf.seq2seq_settings(path)
    start = settings["task.decoder_start_id"]
    assert start == hf_model.config.decoder_start_token_id
    tok = lmflax.load_tokenizer(path).to_lmflax()
    S, T = 16, 12
    rows = [
        s2s_data.encode_pair(tok, s, t, S, T, start) for s, t in zip(SOURCES, TARGETS, strict=True)
    ]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    enc = ref(SOURCES, text_target=TARGETS, max_length=S, truncation=True, padding="max_length")
    labels = ref(text_target=TARGETS, max_length=T, truncation=True, padding="max_length")
    labels = np.asarray(labels["input_ids"])
    np.testing.assert_array_equal(batch["inputs"], enc["input_ids"])
    np.testing.assert_array_equal(batch["inputs_mask"], enc["attention_mask"])
    np.testing.assert_array_equal(batch["targets"], labels)
    labels = np.where(batch["weights"] > 0, labels, -100)
    assert (labels == -100).any() and (labels[:, -1] != -100).any(), "pads and a cut target"
    want_dec = shift_tokens_right(torch.tensor(labels), tok.pad_id, start).numpy()
    np.testing.assert_array_equal(batch["decoder_inputs"], want_dec)

    want = hf_model(
        input_ids=torch.tensor(batch["inputs"], dtype=torch.long),
        attention_mask=torch.tensor(batch["inputs_mask"], dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
    ).loss.item()
    model, params = lmflax.from_pretrained(path)
    _, metrics = seq2seq_loss(
        model, params, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0), True
    )
    total, count = metrics["loss"]
    assert abs(float(total) / float(count) - want) < 1e-5, (float(total) / float(count), want)


# ---------------------------------------------------------------------------------------------
# The configs from a checkpoint decode as transformers' generate


@pytest.mark.parametrize(
    ("config", "family"),
    [("wmt16_ro_en_marian", "marian"), ("cnn_dailymail_bart", "bart")],
)
def test_config_from_a_checkpoint_translates_as_transformers_generate(
    config, family, marian, bart, torch
):
    """`--config=finetune/CONFIG:DIR` takes the model, the tokenizer and the decoding
    conventions from DIR; the task's generation (what evaluation scores) gives the text
    `generate` gives with the checkpoint's own generation settings (Marian: start from and ban
    the pad; BART: start from </s>, force <s> first; both: force </s> at max_length; 2 beams)."""
    from lmflax.tasks import make_task

    path, ref, hf_model = {"marian": marian, "bart": bart}[family]
    cfg, _ = load_config_file(f"finetune/{config}:{path}")
    cfg = resolve(override(cfg, {"data.seq_len": 24, "data.batch_size": 4, "mesh.data": 1}))
    gen = hf_model.generation_config
    assert cfg.task.decoder_start_id == gen.decoder_start_token_id
    assert cfg.generate.forced_eos_id == gen.forced_eos_token_id
    bos = gen.forced_bos_token_id
    assert cfg.generate.forced_bos_id == (-1 if bos is None else bos)
    assert cfg.generate.banned_ids == tuple(b[0] for b in gen.bad_words_ids or ())
    assert cfg.generate.beam_size == 2 and cfg.generate.max_new_tokens == gen.max_length - 1
    task = make_task(cfg)
    _, params = lmflax.from_pretrained(path)
    got = task.generate_text(params, SOURCES[:4], jax.random.key(0))
    enc = ref(SOURCES[:4], padding=True, return_tensors="pt")
    out = hf_model.generate(**enc)
    kwargs = {"use_source_tokenizer": False} if family == "marian" else {}
    want = [ref.decode(row, skip_special_tokens=True, **kwargs) for row in out]
    assert got == want
    assert any(w.strip() for w in want), "the tiny model says something"


# ---------------------------------------------------------------------------------------------
# :tiny end to end


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "metrics"),
    [
        ("wmt16_ro_en_marian", ["bleu"]),
        ("cnn_dailymail_bart", ["rouge1", "rouge2", "rougeL", "rougeLsum"]),
    ],
)
def test_tiny_config_trains_from_its_checkpoint_and_evaluates_by_generation(
    config, metrics, tmp_path, caplog
):
    """`:tiny` exports a random tiny MarianMTModel / BART with the family's conventions, then
    trains from all of its weights on mocked TFDS data and scores generated text."""
    import logging

    import tensorflow_datasets as tfds

    from lmflax.train import run

    cfg, _ = load_config_file(f"finetune/{config}:tiny")
    small = {
        "train.steps": 2, "train.checkpoint_every": 0, "train.eval_steps": 1,
        "train.log_every": 1, "train.progress": False, "data.batch_size": 4,
        "data.seq_len": 24, "task.target_len": 10, "data.tokenizer_train_docs": 16,
        "generate.eval_examples": 4, "data.data_dir": str(tmp_path / "data"), "mesh.data": 1,
    }  # fmt: skip
    cfg = resolve(override(cfg, small))
    directory = Path(cfg.model.init_from.removeprefix("hf:"))
    saved = json.loads((directory / "config.json").read_text())
    assert saved["architectures"] == [
        "MarianMTModel" if "marian" in config else "BartForConditionalGeneration"
    ]
    assert saved["decoder_start_token_id"] == cfg.task.decoder_start_id
    assert saved["forced_eos_token_id"] == cfg.generate.forced_eos_id == 0
    _, want = lmflax.from_pretrained(directory)
    count = len(jax.tree.leaves(want))
    mock = tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE)
    with mock, caplog.at_level(logging.INFO, logger="lmflax"):
        summary = run(cfg, tmp_path / "w", config_name=config)
    assert f"init_from {directory}: loaded {count} of {count} parameters" in caplog.text
    assert summary["final_step"] == 2 and np.isfinite(summary["final_loss"])
    assert sorted(summary["generation"]) == sorted(metrics)
    predictions = (tmp_path / "w" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4


# ---------------------------------------------------------------------------------------------
# Errors


def test_checkpoint_settings_lmflax_cannot_apply_are_refused_by_name(tmp_path):
    from lmflax.hf import CheckpointError, seq2seq_settings

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "marian"}))
    with pytest.raises(CheckpointError, match=r"no decoder_start_token_id .*got None"):
        seq2seq_settings(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"decoder_start_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"bad_words_ids": [[7], [3, 4]], "forced_eos_token_id": [2], "max_length": 9})
    )
    with pytest.raises(CheckpointError, match=r"bad_words_ids \[\[3, 4\]\] ban token sequences"):
        seq2seq_settings(tmp_path)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"bad_words_ids": [[7]], "forced_eos_token_id": [2], "max_length": 9})
    )
    assert seq2seq_settings(tmp_path) == {
        "task.decoder_start_id": 7,
        "generate.forced_bos_id": -1,
        "generate.forced_eos_id": 2,
        "generate.banned_ids": (7,),
        "generate.max_new_tokens": 8,
    }


def test_token_ids_outside_the_vocabulary_are_config_errors():
    from lmflax.config import ConfigError, GenerateConfig, TaskConfig
    from lmflax.tasks import make_task

    errs = GenerateConfig(forced_bos_id=-2, banned_ids=(3, -1)).validate()
    assert any("generate.forced_bos_id" in e and "-2" in e for e in errs), errs
    assert any("generate.banned_ids" in e and "[-1]" in e for e in errs), errs
    assert any("task.decoder_start_id" in e for e in TaskConfig(decoder_start_id=-5).validate())
    cfg, _ = load_config_file("wmt14_de_en:tiny")
    bad = override(cfg, {"task.decoder_start_id": 4096, "generate.banned_ids": (1, 5000)})
    with pytest.raises(ConfigError) as e:
        make_task(resolve(override(bad, {"mesh.data": 1})))
    msg = str(e.value)
    assert "model.vocab_size=4096" in msg and "task.decoder_start_id=4096" in msg
    assert "generate.banned_ids[1]=5000" in msg and "banned_ids[0]" not in msg


def test_min_length_and_no_repeat_ngram_settings_are_read(tmp_path):
    """bart-large-cnn's generation_config (min_length 56 counting the decoder start,
    no_repeat_ngram_size 3) becomes generate.min_new_tokens 55 and no_repeat_ngram_size 3;
    min_new_tokens, when given, wins; repetition_penalty and encoder_repetition_penalty are
    read; what lmflax cannot apply (encoder_no_repeat_ngram_size) is left out."""
    from lmflax.hf import seq2seq_settings

    (tmp_path / "config.json").write_text(json.dumps({"decoder_start_token_id": 2}))
    gen = {
        "min_length": 56,
        "no_repeat_ngram_size": 3,
        "repetition_penalty": 1.2,
        "encoder_repetition_penalty": 1.1,
        "encoder_no_repeat_ngram_size": 2,
    }
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    got = seq2seq_settings(tmp_path)
    assert got["generate.min_new_tokens"] == 55 and got["generate.no_repeat_ngram_size"] == 3
    assert got["generate.repetition_penalty"] == 1.2
    assert got["generate.encoder_repetition_penalty"] == 1.1
    assert not any("no_repeat_ngram" in k and "encoder" in k for k in got)
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "min_new_tokens": 9}))
    assert seq2seq_settings(tmp_path)["generate.min_new_tokens"] == 9
