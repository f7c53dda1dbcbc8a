"""lmflax.hf encoders beyond BERT: RoBERTa, XLM-RoBERTa, DistilBERT and the BERT token / QA
heads. Each tiny model is made and randomly initialised by transformers (PyTorch, CPU), saved
with save_pretrained, loaded into lmflax (outputs within 1e-4 on a padded batch), exported by
lmflax and loaded back into the same transformers class (same outputs, no missing or unexpected
tensors). Nothing is downloaded.
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
from lmflax import hf
from lmflax.config import ConfigError, load_config_file, override
from lmflax.hf import CheckpointError
from lmflax.models import (
    BertConfig,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)
from lmflax.models.bert import roberta_positions
from lmflax.train import resolve

from .conftest import jitted

TOL = 1e-4
V, T = 97, 12
PAD = {"roberta": 1, "xlm-roberta": 1, "bert": 0, "distilbert": 0}

ROBERTA = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=T + 2 + 3,  # padding_idx + 1 + T, and a few spare
    type_vocab_size=1,
    pad_token_id=1,
)
BERT = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=T + 3,
)
DISTILBERT = dict(
    vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=T + 3
)

# architecture -> (config class, config kwargs, lmflax module type, what to compare)
CASES = {
    "RobertaModel": ("RobertaConfig", ROBERTA, RobertaModel, "hidden+pooler"),
    "RobertaForSequenceClassification": (
        "RobertaConfig",
        {**ROBERTA, "num_labels": 3},
        RobertaForSequenceClassification,
        "logits",
    ),
    "RobertaForTokenClassification": (
        "RobertaConfig",
        {**ROBERTA, "num_labels": 5},
        BertForTokenClassification,
        "logits",
    ),
    "RobertaForQuestionAnswering": (
        "RobertaConfig",
        ROBERTA,
        BertForQuestionAnswering,
        "spans",
    ),
    "RobertaForMaskedLM": ("RobertaConfig", ROBERTA, None, "logits"),
    "XLMRobertaModel": ("XLMRobertaConfig", ROBERTA, RobertaModel, "hidden+pooler"),
    "XLMRobertaForSequenceClassification": (
        "XLMRobertaConfig",
        {**ROBERTA, "num_labels": 2},
        RobertaForSequenceClassification,
        "logits",
    ),
    "DistilBertModel": ("DistilBertConfig", DISTILBERT, BertModel, "hidden"),
    "DistilBertForMaskedLM": ("DistilBertConfig", DISTILBERT, None, "logits"),
    "DistilBertForQuestionAnswering": (
        "DistilBertConfig",
        DISTILBERT,
        BertForQuestionAnswering,
        "spans",
    ),
    "BertForTokenClassification": (
        "BertConfig",
        {**BERT, "num_labels": 4},
        BertForTokenClassification,
        "logits",
    ),
    "BertForQuestionAnswering": ("BertConfig", BERT, BertForQuestionAnswering, "spans"),
}


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


def _randomize(torch, model):
    """Every parameter random (biases and norms too), so that a mis-mapped one shows."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        norm = "LayerNorm" in name or "layer_norm" in name
        base = 1.0 if name.endswith("weight") and norm else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _batch(family: str) -> dict[str, np.ndarray]:
    """Two rows, the second right-padded with the family's pad id (RoBERTa's positions are
    counted from input_ids, so the pad id matters), and real tokens that are never the pad id."""
    pad = PAD[family]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, V, (2, T)).astype(np.int32)
    mask = np.ones((2, T), np.int32)
    mask[1, T - 5 :] = 0
    ids[mask == 0] = pad
    out = {"input_ids": ids, "attention_mask": mask}
    if family == "bert":
        out["token_type_ids"] = (np.arange(T)[None, :] >= 5).astype(np.int32).repeat(2, 0)
    return out


def _torch_outputs(torch, model, batch, what):
    out = model(**{k: torch.tensor(v.astype(np.int64)) for k, v in batch.items()})
    if what == "logits":
        return [out.logits.numpy()]
    if what == "spans":
        return [out.start_logits.numpy(), out.end_logits.numpy()]
    got = [out.last_hidden_state.numpy()]
    if what == "hidden+pooler":
        got.append(out.pooler_output.numpy())
    return got


def _lmflax_outputs(model, params, batch, what):
    out = jitted(model)(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("token_type_ids"),
        deterministic=True,
    )
    if what == "logits":
        return [np.asarray(out)]
    if what == "spans":
        return [np.asarray(out.start_logits), np.asarray(out.end_logits)]
    got = [np.asarray(out.last_hidden_state)]
    if what == "hidden+pooler":
        got.append(np.asarray(out.pooler_output))
    return got


def _close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert np.abs(x - y).max() <= TOL, np.abs(x - y).max()


@pytest.mark.parametrize("name", list(CASES))
def test_encoder_from_transformers_and_back(name, tmp_path, torch, transformers):
    config_cls, kwargs, module_type, what = CASES[name]
    torch.manual_seed(0)
    ref = _randomize(
        torch, getattr(transformers, name)(getattr(transformers, config_cls)(**kwargs))
    )
    ref.save_pretrained(tmp_path / "hf")
    family = ref.config.model_type
    batch = _batch(family)
    want = _torch_outputs(torch, ref, batch, what)

    model, params = lmflax.from_pretrained(tmp_path / "hf")
    if module_type is not None:
        assert type(model) is module_type
    if family in ("roberta", "xlm-roberta"):
        assert isinstance(model.config, RobertaConfig) and model.config.pad_token_id == 1
    if family == "distilbert":
        assert model.config.type_vocab_size == 0 and "type_embed" not in str(params.keys())
    ours = _lmflax_outputs(model, params, batch, what)
    _close(ours, want)

    # lmflax's export, loaded back by the same transformers class.
    hf.save_pretrained(model.config, params, tmp_path / "out", architecture=name)
    back, info = getattr(transformers, name).from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [name]
    _close(_torch_outputs(torch, back.eval(), batch, what), ours)


def test_roberta_positions_follow_the_non_pad_tokens():
    ids = np.array([[0, 5, 6, 2, 1, 1], [0, 1, 7, 2, 1, 1]])
    np.testing.assert_array_equal(
        np.asarray(roberta_positions(jnp.asarray(ids), 1)),
        [[2, 3, 4, 5, 1, 1], [2, 1, 3, 4, 1, 1]],
    )


def _hf_roberta_dir(torch, transformers, path, cls="RobertaForSequenceClassification", **kw):
    torch.manual_seed(0)
    model = getattr(transformers, cls)(transformers.RobertaConfig(**{**ROBERTA, **kw}))
    _randomize(torch, model).save_pretrained(path)
    return path


def test_export_picks_the_architecture_from_the_parameters(tmp_path, torch, transformers):
    """Without architecture=: RoBERTa heads by their parameter names; a BERT without token
    types as DistilBERT; an ambiguous BERT classifier (no pooler) is refused by name."""
    for cls in (
        "RobertaForSequenceClassification",
        "RobertaForTokenClassification",
        "RobertaForQuestionAnswering",
        "RobertaModel",
    ):
        labels = 2 if cls.endswith("QuestionAnswering") else 3  # HF's qa_outputs has num_labels
        src = _hf_roberta_dir(torch, transformers, tmp_path / cls, cls, num_labels=labels)
        model, params = lmflax.from_pretrained(src)
        out = hf.save_pretrained(model.config, params, tmp_path / f"{cls}_out")
        assert json.loads((out / "config.json").read_text())["architectures"] == [cls]
    cfg = BertConfig(
        vocab_size=V,
        num_layers=1,
        d_model=16,
        num_heads=2,
        d_ff=24,
        max_len=16,
        type_vocab_size=0,
        add_pooler=False,
    )
    params = jax.tree.map(
        lambda x: np.zeros(x.shape, x.dtype), hf.pretrained.abstract_params(BertModel(cfg))
    )
    out = hf.save_pretrained(cfg, params, tmp_path / "distil")
    assert json.loads((out / "config.json").read_text())["model_type"] == "distilbert"
    tagger = BertForTokenClassification(dataclasses.replace(cfg, type_vocab_size=2), 3)
    tparams = hf.pretrained.abstract_params(tagger)
    tparams = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tparams)
    with pytest.raises(CheckpointError, match="architecture='BertForTokenClassification'"):
        hf.save_pretrained(tagger.config, tparams, tmp_path / "tagger")
    hf.save_pretrained(
        tagger.config, tparams, tmp_path / "tagger", architecture="BertForTokenClassification"
    )
    again, _ = lmflax.from_pretrained(tmp_path / "tagger")
    assert type(again) is BertForTokenClassification and again.num_labels == 3


def test_unsupported_options_are_refused_by_name_before_weights(tmp_path, torch, transformers):
    """A bad option stops at config.json: the weights file is not even opened (it is garbage)."""

    def write(name, config):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        (d / "model.safetensors").write_bytes(b"not a safetensors file")
        return d

    base = {**ROBERTA, "model_type": "roberta", "hidden_act": "gelu"}
    cases = [
        ({**base, "architectures": ["RobertaForCausalLM"]}, r"RobertaForCausalLM.*not supported"),
        ({**base, "architectures": ["RobertaModel"], "is_decoder": True}, "as a decoder"),
        (
            {**base, "architectures": ["RobertaModel"], "position_embedding_type": "relative_key"},
            "position_embedding_type='relative_key' is not supported",
        ),
        (
            {**base, "architectures": ["RobertaForMaskedLM"], "hidden_act": "relu"},
            "applies exact gelu",
        ),
        (
            {
                **DISTILBERT,
                "model_type": "distilbert",
                "architectures": ["DistilBertModel"],
                "sinusoidal_pos_embds": True,
            },
            "sinusoidal_pos_embds=True is not supported",
        ),
        (
            {
                **DISTILBERT,
                "model_type": "distilbert",
                "architectures": ["DistilBertForSequenceClassification"],
            },
            "DistilBertForSequenceClassification.*not supported",
        ),
    ]
    for i, (config, match) in enumerate(cases):
        with pytest.raises(CheckpointError, match=match):
            lmflax.from_pretrained(write(f"c{i}", config))


def test_init_from_a_roberta_checkpoint_starts_a_classification_task(tmp_path, torch, transformers):
    """`model=hf:DIR` of a RobertaForMaskedLM (what roberta-base is): the classification task
    builds RoBERTa's own head, the encoder starts from the checkpoint, the head is fresh."""
    from lmflax.tasks import make_task

    src = _hf_roberta_dir(torch, transformers, tmp_path / "mlm", "RobertaForMaskedLM")
    cfg, _ = load_config_file("sst2")
    cfg = resolve(override(cfg, {"model": f"hf:{src}", "data.seq_len": T, "mesh.data": 1}))
    assert isinstance(cfg.model, RobertaConfig) and cfg.model.init_from == f"hf:{src.resolve()}"
    task = make_task(cfg)
    assert isinstance(task.model, RobertaForSequenceClassification)
    fresh = hf.pretrained.abstract_params(task.model)
    fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), fresh)
    loaded = hf.init_params(cfg.model, fresh)
    _, want = lmflax.from_pretrained(src)
    jax.tree.map(np.testing.assert_array_equal, loaded["bert"], want["bert"])
    assert not np.any(np.asarray(loaded["classifier"]["out_proj"]["kernel"]))
    # A mismatching RoBERTa setting is named with the checkpoint's value.
    with pytest.raises(ConfigError, match=r"model.pad_token_id is 0 but .*pad_token_id=1"):
        resolve(override(cfg, {"model.pad_token_id": 0}))


# ---------------------------------------------------------------------------------------------
# The RoBERTa fine-tuning configs, end to end on mocked TFDS data

MOCK = {
    "model.vocab_size": 256,
    "model.num_layers": 1,
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.d_ff": 64,
    "data.batch_size": 16,
    "data.seq_len": 32,
    "train.steps": 4,
    "train.eval_every": 2,
    "train.log_every": 2,
    "train.checkpoint_every": 0,
    "train.progress": False,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sst2_roberta", "conll2003_roberta"])
def test_roberta_configs_run_end_to_end_under_mock_data(name, tmp_path):
    import tensorflow_datasets as tfds

    from lmflax.train import run

    cfg, _ = load_config_file(f"finetune/{name}:tiny")
    assert isinstance(cfg.model, RobertaConfig)
    cfg = override(cfg, {**MOCK, "data.data_dir": str(tmp_path)})
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = run(cfg, tmp_path / "w", config_name=name)
    assert summary["eval"]["examples"] == 12 and np.isfinite(summary["eval"]["loss"])
    # A tokenizer whose padding id is not the model's is refused by name.
    bad = override(cfg, {"model.pad_token_id": 1})
    mock = tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE)
    refused = pytest.raises(ConfigError, match=r"model.pad_token_id is 1, but the tokenizer")
    with mock, refused:
        run(bad, tmp_path / "bad", config_name=name)


def _roberta_with_tokenizer(torch, transformers, path):
    """A tiny RobertaForMaskedLM (what roberta-base is) with a byte-level BPE tokenizer.json
    trained here: <s> <pad> </s> <unk> <mask> are ids 0-4, as in RoBERTa's."""
    import tokenizers

    tok = tokenizers.ByteLevelBPETokenizer()
    words = ["a", "good", "movie", "with", "great", "actors", "and", "a", "bad", "plot"]
    tok.train_from_iterator(
        [" ".join(words[i:] + words[:i]) for i in range(len(words))],
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    kw = {**ROBERTA, "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 40}
    _hf_roberta_dir(torch, transformers, path, "RobertaForMaskedLM", **kw)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.mark.slow
def test_sst2_roberta_fine_tunes_a_checkpoint_with_its_tokenizer(tmp_path, torch, transformers):
    """`--config=sst2_roberta:DIR`: model and tokenizer from the checkpoint, the trainer starts
    from its weights (a fresh head) and runs on mocked glue/sst2."""
    import tensorflow_datasets as tfds

    from lmflax.train import Trainer, run

    src = _roberta_with_tokenizer(torch, transformers, tmp_path / "ckpt")
    cfg, _ = load_config_file(f"finetune/sst2_roberta:{src}")
    settings = {k: v for k, v in MOCK.items() if not k.startswith("model.")}
    cfg = resolve(override(cfg, {**settings, "data.data_dir": str(tmp_path), "mesh.data": 1}))
    assert cfg.model.pad_token_id == 1 and cfg.data.tokenizer == f"hf:{src}"
    trainer = Trainer.create(cfg)
    _, want = lmflax.from_pretrained(src)
    jax.tree.map(np.testing.assert_array_equal, dict(trainer.state.params["bert"]), want["bert"])
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = run(cfg, tmp_path / "w", config_name="sst2_roberta")
    assert summary["eval"]["examples"] == 12 and np.isfinite(summary["eval"]["loss"])


def test_token_types_reach_only_models_with_a_segment_table():
    """A RoBERTa (one token type) QA task gets no token_type_ids: the context's 1s would index
    past its table (a zero embedding) instead of type 0, as HF's tokenizers give RoBERTa."""
    from lmflax.tasks import make_task

    cfg, _ = load_config_file("squad")
    model = dataclasses.replace(
        RobertaConfig(vocab_size=64, num_layers=1, d_model=16, num_heads=2, d_ff=24, max_len=80),
        pad_token_id=0,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )
    sizes = {"data.seq_len": 64, "task.max_query_len": 16, "task.doc_stride": 24}
    cfg = resolve(
        override(cfg, {"model": model, **sizes, "task.max_answer_len": 8, "mesh.data": 1})
    )
    task = make_task(cfg)
    batch = task.dummy_batch(2)
    assert batch["token_type_ids"].any()
    params = task.init(jax.random.key(0), batch)["params"]
    got = task.apply(params, batch, None, True)
    want = task.model.apply(
        {"params": params}, batch["inputs"], batch["attention_mask"], None, deterministic=True
    )
    np.testing.assert_allclose(np.asarray(got.start_logits), np.asarray(want.start_logits))


def test_export_with_a_tokenizer_padding_elsewhere_is_refused(tmp_path, torch, transformers):
    """RoBERTa's positions skip the pad_token_id tokens: a tokenizer padding with another id
    would give HF other positions than lmflax computed, so the export stops by name."""
    src = _roberta_with_tokenizer(torch, transformers, tmp_path / "ckpt")
    (src / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    tok = lmflax.load_tokenizer(src)
    model, params = lmflax.from_pretrained(src)
    out = hf.save_pretrained(model.config, params, tmp_path / "ok", tokenizer=tok)
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 1
    other = dataclasses.replace(model.config, pad_token_id=3)
    with pytest.raises(CheckpointError, match=r"pads with id 1, but model.pad_token_id is 3"):
        hf.save_pretrained(other, params, tmp_path / "bad", tokenizer=tok)


@pytest.mark.slow
def test_squad_bert_fine_tunes_a_qa_checkpoint_with_its_tokenizer(tmp_path, torch, transformers):
    """`--config=finetune/squad_bert:DIR`: a BertForQuestionAnswering saved by transformers with
    its vocab.txt; model and tokenizer come from DIR, the trainer starts from all its weights
    (span head included) and runs on mocked squad."""
    import tensorflow_datasets as tfds

    from lmflax.train import Trainer, run

    words = ["the", "a", "what", "is", "who", "answer", "question", "context", "of", "in"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + words + letters + [f"##{c}" for c in letters]
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (src / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    )
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForQuestionAnswering(config).eval().save_pretrained(src)
    cfg, _ = load_config_file(f"finetune/squad_bert:{src}")
    sizes = {"data.seq_len": 48, "task.max_query_len": 16, "task.doc_stride": 16}
    settings = {k: v for k, v in MOCK.items() if not k.startswith(("model.", "data.seq_len"))}
    cfg = resolve(
        override(cfg, {**settings, **sizes, "data.data_dir": str(tmp_path), "mesh.data": 1})
    )
    assert cfg.data.tokenizer == f"hf:{src}" and cfg.task.name == "qa"
    trainer = Trainer.create(cfg)
    _, want = lmflax.from_pretrained(src)
    got = trainer.state.params
    jax.tree.map(np.testing.assert_array_equal, dict(got), dict(want))
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = run(cfg, tmp_path / "w", config_name="squad_bert")
    assert np.isfinite(summary["eval"]["loss"]) and "exact_match" in summary["eval"]
