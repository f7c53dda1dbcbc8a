"""The embedded corpus, tokenizers, packing, objectives, resumable pipelines and clear data errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lmflax.config import load_config_file, override
from lmflax.data import objectives, pipeline, sources
from lmflax.data.sources import DataError
from lmflax.data.tokenizers import Tokenizer, train_tokenizer


def _cfg(data_dir, name="gpt_tiny", **updates):
    cfg, _ = load_config_file(name)
    return override(cfg, {"data.data_dir": data_dir, "data.seq_len": 32, **updates})


def test_embedded_corpus_splits(data_dir):
    train = sources.data_source(sources.EMBEDDED, "train", data_dir)
    val = sources.data_source(sources.EMBEDDED, "validation", data_dir)
    assert len(train) > 1000 and len(val) > 10
    train_sources = {train[i]["source"] for i in range(0, len(train), 7)}
    val_sources = {val[i]["source"] for i in range(len(val))}
    assert not train_sources & val_sources
    assert any(s.startswith(b"Doc/topics/") for s in train_sources | val_sources)
    assert all(len(train[i]["text"]) > 0 for i in range(50))


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="'no_such_dataset' is not a dataset TFDS knows"):
        sources.data_source("no_such_dataset", "train", str(tmp_path))
    with pytest.raises(DataError, match="split 'tset'"):
        sources.data_source(sources.EMBEDDED, "tset", str(tmp_path))


def test_text_errors():
    with pytest.raises(DataError, match="not valid UTF-8"):
        pipeline.text_of({"text": b"ok \xff\xfe bad"}, "text", 12)
    with pytest.raises(DataError, match="has no text feature 'body'"):
        pipeline.text_of({"text": b"x"}, "body", 0)


def test_bpe_round_trip_and_wordpiece_specials():
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 50
    bpe = train_tokenizer("bpe", iter(texts), 300)
    for t in [*texts[:2], "unseen ünïcödé 字"]:
        assert bpe.decode(bpe.encode(t)) == t
    assert bpe.eos_id is not None and bpe.mask_id is None
    wp = train_tokenizer("wordpiece", iter(texts), 200)
    assert {wp.pad_id, wp.cls_id, wp.sep_id, wp.mask_id} == {0, 2, 3, 4}
    assert wp.decode(wp.encode("Return X")) == "return x"


def test_tokenizer_larger_than_model_vocab_is_refused(data_dir, tmp_path):
    tok = train_tokenizer("bpe", iter(["abc def ghi"] * 10), 300)
    path = tmp_path / "tok.json"
    tok.save(path)
    assert Tokenizer.from_file(path).vocab_size > 100
    cfg = _cfg(data_dir, **{"data.tokenizer": str(path)})
    with pytest.raises(DataError, match="ids would fall outside the embedding table"):
        pipeline.tokenizer_for(cfg.data, 100)


def test_causal_batches(data_dir):
    cfg = _cfg(data_dir)
    tok = pipeline.tokenizer_for(cfg.data, cfg.model.vocab_size)
    it = iter(pipeline.causal_lm_dataset(cfg, tok, "train", seed=0, batch_size=4))
    for _ in range(3):
        b = next(it)
        assert set(b) == {"inputs", "targets", "positions", "segment_ids", "weights"}
        assert all(v.shape == (4, 32) for v in b.values())
        seg, inp, tgt, pos = b["segment_ids"], b["inputs"], b["targets"], b["positions"]
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        # Within a document the next input is this position's target.
        np.testing.assert_array_equal(inp[:, 1:][same], tgt[:, :-1][same])
        np.testing.assert_array_equal(pos[:, 1:][same], pos[:, :-1][same] + 1)
        np.testing.assert_array_equal(b["weights"], (seg > 0).astype(np.float32))
        assert inp.max() < tok.vocab_size
    it.close()


def test_mlm_batches(data_dir):
    cfg = _cfg(data_dir, "bert_tiny")
    tok = pipeline.tokenizer_for(cfg.data, cfg.model.vocab_size, "wordpiece")
    it = iter(pipeline.mlm_dataset(cfg, tok, "train", seed=0, batch_size=8))
    b = next(it)
    assert set(b) == {"inputs", "targets", "weights", "attention_mask"}
    assert np.all(b["targets"][:, 0] == tok.cls_id)
    chosen = b["weights"] > 0
    np.testing.assert_array_equal(b["inputs"][~chosen], b["targets"][~chosen])
    assert not np.isin(b["targets"][chosen], tok.special_ids).any()
    assert 0.05 < chosen.mean() < 0.3
    it.close()


def test_mask_tokens_statistics():
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 1000, size=200_000).astype(np.int32)
    tokens[::50] = 3  # a special token
    out = objectives.mask_tokens(tokens, rng, vocab_size=1000, mask_id=4, special_ids=[0, 3, 4])
    chosen = out["weights"] > 0
    assert not chosen[::50].any()
    assert abs(chosen.mean() - 0.15 * 49 / 50) < 0.005
    masked = (out["inputs"] == 4) & chosen
    kept = (out["inputs"] == tokens) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.01
    # 10% random + the 10% kept, plus random draws that happen to equal the token (rare).
    assert abs(kept.sum() / chosen.sum() - 0.1) < 0.01
    np.testing.assert_array_equal(out["targets"], tokens)


def test_causal_document():
    ex = objectives.causal_document([5, 6, 7], eos_id=0)
    np.testing.assert_array_equal(ex["inputs"], [0, 5, 6, 7])
    np.testing.assert_array_equal(ex["targets"], [5, 6, 7, 0])


@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny"])
def test_pipeline_resumes_exactly(data_dir, name):
    cfg = _cfg(data_dir, name, **{"data.seq_len": 64})
    kind = "wordpiece" if name == "bert_tiny" else "bpe"
    tok = pipeline.tokenizer_for(cfg.data, cfg.model.vocab_size, kind)
    make = pipeline.mlm_dataset if name == "bert_tiny" else pipeline.causal_lm_dataset
    it = iter(make(cfg, tok, "train", seed=3, batch_size=8))
    for _ in range(5):
        next(it)
    # Through JSON, as checkpoints store it.
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    it.close()
    it2 = iter(make(cfg, tok, "train", seed=3, batch_size=8))
    it2.set_state(pipeline.state_from_json(state))
    for want in expected:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    it2.close()


def test_processes_read_disjoint_documents(data_dir):
    """Process i of n reads records i, i+n, i+2n, ... of the one shuffled global order."""
    cfg = _cfg(data_dir)
    whole = pipeline.documents(cfg.data, "train", seed=0)
    for n in (2, 3):
        parts = [
            pipeline.documents(cfg.data, "train", seed=0, process_index=i, process_count=n)
            for i in range(n)
        ]
        for j in range(30):
            for i in range(n):
                assert parts[i][j]["text"] == whole[j * n + i]["text"]


def test_different_seeds_shuffle_differently(data_dir):
    cfg = _cfg(data_dir)
    a = pipeline.documents(cfg.data, "train", seed=0)
    b = pipeline.documents(cfg.data, "train", seed=1)
    assert [a[i]["text"] for i in range(5)] != [b[i]["text"] for i in range(5)]
    assert dataclasses.asdict(cfg.data)["shuffle_buffer"] > 1
