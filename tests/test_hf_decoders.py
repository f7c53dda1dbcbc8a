"""Llama-family decoders (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) against
transformers (PyTorch, CPU): tiny random models that transformers initialises and saves load into
lmflax with the same logits on padded batches, lmflax's export loads back into transformers, and
lmflax.decode's greedy and beam search give the tokens `generate` gives. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmflax
from lmflax import decode, hf
from lmflax.hf import CheckpointError
from lmflax.models import GPT

from .conftest import ROOT, jitted

TOL = 1e-4
V = 97


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


COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# name -> (config class, its kwargs). Between them: GQA and MHA, head_dim != hidden / heads,
# tied and untied output layers, every supported rope_type, Llama's biases, Mistral's window.
TINY = {
    "llama3": (
        "LlamaConfig",
        dict(
            COMMON,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500.0,
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "llama_linear_tied_bias": (
        "LlamaConfig",
        dict(
            COMMON,
            num_key_value_heads=4,
            head_dim=12,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        ),
    ),
    "mistral": ("MistralConfig", dict(COMMON, sliding_window=3)),
    "qwen2": ("Qwen2Config", dict(COMMON, tie_word_embeddings=True, rope_theta=1000.0)),
}


def _randomize(torch, model):
    """Every parameter random (biases and norms too), so a mis-mapped one shows."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        base = 1.0 if "norm" in name else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, torch, transformers):
    """{name: (directory saved by transformers, the torch model)}."""
    root = tmp_path_factory.mktemp("hf_decoders")
    out = {}
    for name, (cls, kwargs) in TINY.items():
        torch.manual_seed(0)
        config = getattr(transformers, cls)(**kwargs)
        model = _randomize(torch, transformers.AutoModelForCausalLM.from_config(config))
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def _padded_batch(side: str, T: int = 9):
    """ids [3, T], mask [3, T] (rows of T, T - 3 and T - 5 real tokens), positions [3, T]."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (3, T)).astype(np.int32)
    mask = np.ones((3, T), np.int32)
    for row, n in ((1, 3), (2, 5)):
        if side == "right":
            mask[row, T - n :] = 0
        else:
            mask[row, :n] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions


def _torch_logits(torch, model, ids, mask, positions):
    out = model(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
    )
    return out.logits.float().numpy()


def _lmflax_logits(model, params, ids, mask, positions):
    return np.asarray(
        jitted(model)(
            {"params": params}, ids, positions=positions, attention_mask=mask, deterministic=True
        )
    )


def _max_err(a, b, mask):
    """Largest difference over the real tokens."""
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("name", list(TINY))
def test_loads_with_transformers_logits_and_exports_back(name, tiny, tmp_path, torch, transformers):
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    assert isinstance(model, GPT)
    c = model.config
    assert (c.norm, c.activation, c.position, c.norm_position) == (
        "rmsnorm",
        "swiglu",
        "rope",
        "pre",
    )
    hf_cfg = ref.config
    assert c.resolved_kv_heads == hf_cfg.num_key_value_heads
    assert c.tie_embeddings == hf_cfg.tie_word_embeddings
    assert ("lm_head" in params) != c.tie_embeddings
    for side in ("right", "left"):
        ids, mask, positions = _padded_batch(side)
        want = _torch_logits(torch, ref, ids, mask, positions)
        ours = _lmflax_logits(model, params, ids, mask, positions)
        assert _max_err(ours, want, mask) <= TOL, side
    # Back to transformers: same architecture, nothing missing or left over, same logits.
    lmflax.save_pretrained(c, params, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [type(ref).__name__]
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert type(back) is type(ref)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask, positions = _padded_batch("left")
    again = _torch_logits(torch, back.eval(), ids, mask, positions)
    assert _max_err(again, _lmflax_logits(model, params, ids, mask, positions), mask) <= TOL
    # And lmflax reads its own export as it read transformers' save.
    model2, params2 = lmflax.from_pretrained(tmp_path)
    assert model2.config == c
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, params2))


def test_settings_reach_the_model(tiny, torch):
    """The window, the rope scaling and the biases change the logits (so the parity above
    tests them): dropping each one moves lmflax away from transformers."""
    ids, mask, positions = _padded_batch("right")
    for name, field, plain in (
        ("mistral", "sliding_window", None),
        ("llama3", "rope_scaling", "none"),
        ("llama_linear_tied_bias", "rope_scaling", "none"),
    ):
        path, ref = tiny[name]
        model, params = lmflax.from_pretrained(path)
        want = _torch_logits(torch, ref, ids, mask, positions)
        extra = {"rope_scaling_factor": 1.0} if field == "rope_scaling" else {}
        if name == "llama3" and field == "rope_scaling":
            extra.update(
                rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192
            )
        changed = GPT(dataclasses.replace(model.config, **{field: plain}, **extra))
        off = _lmflax_logits(changed, params, ids, mask, positions)
        assert _max_err(off, want, mask) > 1e-3, (name, field)


def _edited(path, tmp_path, **changes):
    """A copy of a saved model with config.json keys changed (None deletes)."""
    out = tmp_path / "edited"
    out.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    return out


@pytest.mark.parametrize(
    ("name", "changes", "match"),
    [
        ("llama3", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, r"rope_type='yarn'"),
        ("llama3", {"rope_parameters": {"rope_type": "dynamic"}}, r"'dynamic'.*'llama3'"),
        ("llama3", {"hidden_act": "gelu"}, r"hidden_act='gelu'"),
        ("qwen2", {"use_sliding_window": True}, r"use_sliding_window"),
        ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, r"sliding_attention"),
        (
            "llama3",
            {"architectures": ["GemmaForCausalLM"], "model_type": "gemma"},
            r"GemmaForCausalLM.*LlamaForCausalLM.*'llama'",
        ),
        ("mistral", {"architectures": ["LlamaForCausalLM"]}, r"needs model_type 'llama'"),
    ],
)
def test_unsupported_settings_are_refused_by_name_before_weights(
    name, changes, match, tiny, tmp_path, monkeypatch
):
    path = _edited(tiny[name][0], tmp_path, **changes)

    def no_reading(self, key):
        raise AssertionError(f"weight {key} read before the config was judged")

    monkeypatch.setattr(hf.files.WeightSource, "__getitem__", no_reading)
    with pytest.raises(CheckpointError, match=match):
        lmflax.from_pretrained(path)
    with pytest.raises(AssertionError, match="read before"):  # the guard does guard
        lmflax.from_pretrained(tiny[name][0])


def test_old_style_rope_keys_load(tiny, tmp_path, torch):
    """Configs written before transformers 5 carry rope_theta + rope_scaling ('type' or
    'rope_type'); they mean what rope_parameters means."""
    path, ref = tiny["llama3"]
    rope = dict(ref.config.rope_parameters)
    theta = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    old = _edited(path, tmp_path, rope_parameters=None, rope_theta=theta)
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**cfg, "rope_scaling": rope}))
    model, _ = lmflax.from_pretrained(old)
    want_model, _ = lmflax.from_pretrained(path)
    assert model.config == want_model.config
    assert model.config.rope_scaling == "llama3" and model.config.rope_base == 500.0


# ---------------------------------------------------------------------------------------------
# Generation: lmflax.decode against transformers' generate, token for token

PROMPTS = [[5, 17, 33, 2, 61], [40, 8], [11, 90, 3, 27, 71, 6, 50]]
PAD = 1  # not 0: transformers fills finished beams with EOS when pad_token_id is 0
NEW = 10


def _hf_generate(torch, model, **kwargs):
    """transformers' generate on the left-padded PROMPTS -> new tokens [B, NEW] (PAD after the
    end, as lmflax returns them)."""
    ids, mask = decode.left_pad(PROMPTS, PAD)
    out = model.generate(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=NEW,
        pad_token_id=PAD,
        do_sample=False,
        **kwargs,
    ).numpy()[:, ids.shape[1] :]
    full = np.full((len(PROMPTS), NEW), PAD, np.int64)
    full[:, : out.shape[1]] = out
    return full


def _eos_for(torch, model):
    """An EOS id that greedy decoding does produce (so that stopping is exercised): the most
    frequent new token, found by running transformers without one."""
    tokens = _hf_generate(torch, model, eos_token_id=None, num_beams=1)
    return int(np.bincount(tokens.ravel()).argmax())


@pytest.mark.parametrize("name", list(TINY))
def test_greedy_equals_transformers_generate(name, tiny, torch):
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    eos = _eos_for(torch, ref)
    want = _hf_generate(torch, ref, eos_token_id=eos, num_beams=1)
    assert (want == eos).any() and (want[:, -1] != eos).any()  # stops somewhere, not everywhere
    ids, mask = decode.left_pad(PROMPTS, PAD)
    out = decode.generate(
        model,
        params,
        ids,
        prompt_mask=mask,
        max_new_tokens=NEW,
        rng=jax.random.key(0),
        temperature=0.0,
        eos_id=eos,
        pad_id=PAD,
    )
    np.testing.assert_array_equal(np.asarray(out)[:, ids.shape[1] :], want)


BEAMS = [
    (3, 1.5, True),
    (4, 2.0, False),
    (3, 2.0, "never"),
]


BEAM_CASES = [
    *((name, *b) for name in ("llama3", "mistral") for b in BEAMS),
    ("qwen2", 3, 1.5, True),
    ("llama_linear_tied_bias", 3, 2.0, "never"),
]


@pytest.mark.parametrize(("name", "beams", "alpha", "early"), BEAM_CASES)
def test_beam_search_equals_transformers_generate(name, beams, alpha, early, tiny, torch):
    path, ref = tiny[name]
    model, params = lmflax.from_pretrained(path)
    eos = _eos_for(torch, ref)
    want = _hf_generate(
        torch,
        ref,
        eos_token_id=eos,
        num_beams=beams,
        length_penalty=alpha,
        early_stopping=early,
    )
    ids, mask = decode.left_pad(PROMPTS, PAD)
    out = decode.beam_search(
        model,
        params,
        ids,
        prompt_mask=mask,
        beam_size=beams,
        max_new_tokens=NEW,
        eos_id=eos,
        pad_id=PAD,
        length_penalty=alpha,
        length_penalty_form="hf",
        early_stopping=early,
    )
    np.testing.assert_array_equal(np.asarray(out.sequences[:, 0]), want)
    # The same from a config's generate section (what train.py --generate and eval use).
    from lmflax.config import GenerateConfig

    settings = GenerateConfig(
        beam_size=beams,
        length_penalty=alpha,
        length_penalty_form="hf",
        early_stopping=str(early).lower(),
    )
    via_config = decode.generate_tokens(
        settings,
        model,
        params,
        ids,
        prompt_mask=mask,
        max_new_tokens=NEW,
        rng=jax.random.key(0),
        eos_id=eos,
        pad_id=PAD,
    )
    np.testing.assert_array_equal(np.asarray(via_config), want)


@pytest.mark.parametrize(
    ("kind", "beams", "penalty"),
    [
        ("repetition_penalty", 1, 1.8),
        ("repetition_penalty", 3, 1.8),
        ("repetition_penalty", 1, 0.6),
        ("encoder_repetition_penalty", 1, 1.8),
        ("encoder_repetition_penalty", 3, 0.6),
    ],
)
def test_repetition_penalties_equal_transformers_generate(kind, beams, penalty, tiny, torch):
    """transformers' repetition_penalty (over the left-padded prompt's real tokens, its leading
    pads skipped, and the new tokens) and encoder_repetition_penalty (over the prompt as given,
    pads included) = Constraints(...=p), greedy and beam, a penalty above 1 and one below; each
    changes what the random model says."""
    path, ref = tiny["llama3"]
    model, params = lmflax.from_pretrained(path)
    eos = _eos_for(torch, ref)
    beam = {"length_penalty": 1.0, "early_stopping": True} if beams > 1 else {}
    plain = _hf_generate(torch, ref, eos_token_id=eos, num_beams=beams, **beam)
    want = _hf_generate(torch, ref, eos_token_id=eos, num_beams=beams, **{kind: penalty}, **beam)
    assert not np.array_equal(want, plain), "the penalty must change the output"
    ids, mask = decode.left_pad(PROMPTS, PAD)
    constraints = decode.Constraints(**{kind: penalty})
    common = dict(prompt_mask=mask, max_new_tokens=NEW, eos_id=eos, pad_id=PAD)
    if beams > 1:
        out = decode.beam_search(
            model, params, ids, beam_size=beams, length_penalty=1.0, length_penalty_form="hf",
            early_stopping=True, constraints=constraints, **common,
        ).sequences[:, 0]  # fmt: skip
    else:
        out = decode.generate(
            model, params, ids, rng=jax.random.key(0), temperature=0.0,
            constraints=constraints, **common,
        )[:, ids.shape[1] :]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out), want)


def test_tokens_present_against_a_loop():
    """tokens_present = the set of tokens among positions start..length-1 of each row, every
    length, with a per-row start (leading_pads of a left-padding mask) and without."""
    rng = np.random.default_rng(1)
    hist = rng.integers(0, 6, size=(3, 7)).astype(np.int32)
    mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [0] * 5 + [1] * 2])
    starts = np.asarray(decode.leading_pads(jnp.asarray(mask), 3))
    np.testing.assert_array_equal(starts, [0, 2, 5])
    for start in (np.zeros(3, np.int32), starts):
        for length in range(hist.shape[1] + 1):
            got = decode.tokens_present(jnp.asarray(hist), length, 6, jnp.asarray(start))
            want = np.zeros((3, 6), bool)
            for r in range(3):
                want[r, hist[r, start[r] : length]] = True
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{start=} {length=}")


# ---------------------------------------------------------------------------------------------
# A Llama-style tokenizer.json, and training from a Llama checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, torch, transformers):
    """A tiny random Llama saved by transformers with a SentencePiece-style tokenizer.json
    (byte-fallback BPE over '▁'-marked words, '<s>' prepended, as Llama's), trained here."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    path = tmp_path_factory.mktemp("llama_tok")
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    text = (ROOT / "README.md").read_text().splitlines()
    # ids: <unk> 0, <s> 1, </s> 2, bytes 3..258 (as in Llama's vocabulary), then merges.
    specials = ["<unk>", "<s>", "</s>", *byte_tokens]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": tok.get_vocab_size()})
    torch.manual_seed(0)
    _randomize(torch, transformers.LlamaForCausalLM(config)).save_pretrained(path)
    return path


TEXTS = ["Hello world, this is lmflax.", "Ünïcödé ✓ 🙂 and\ttabs", "  leading  spaces", "x"]


def test_llama_tokenizer_json_matches_transformers(llama_dir, transformers):
    ref = transformers.AutoTokenizer.from_pretrained(llama_dir)
    ours = lmflax.load_tokenizer(llama_dir)
    want = ref(TEXTS)
    got = ours(TEXTS, padding=False, return_tensors=None)
    assert set(got) == set(want) == {"input_ids", "attention_mask"}  # no token_type_ids
    assert got["input_ids"] == want["input_ids"]
    assert any(3 <= t < 259 for t in got["input_ids"][1])  # byte fallback was exercised
    for ids in want["input_ids"]:
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (ours.token_id("bos_token"), ours.token_id("eos_token")) == (1, 2)
    assert (ref.bos_token_id, ref.eos_token_id) == (1, 2)


def test_model_hf_dir_trains_from_the_llama_checkpoint(llama_dir):
    """`--config.model=hf:DIR` on a Llama directory: a GPT config with the checkpoint's
    settings and init_from, from which the Trainer starts with exactly its weights; a scanned
    model gets them stacked."""
    from lmflax.config import apply_overrides, load_config_file
    from lmflax.train import Trainer, resolve

    cfg, _ = load_config_file("gpt_tiny")
    cfg = apply_overrides(
        cfg,
        [
            f"model=hf:{llama_dir}",
            f"data.tokenizer=hf:{llama_dir}",
            "data.seq_len=16",
            "data.batch_size=2",
        ],
    )
    cfg = resolve(cfg)
    assert cfg.model.init_from == f"hf:{llama_dir.resolve()}"
    assert (cfg.model.norm, cfg.model.activation, cfg.model.position) == (
        "rmsnorm",
        "swiglu",
        "rope",
    )
    trainer = Trainer.create(cfg)
    _, want = lmflax.from_pretrained(llama_dir)
    jax.tree.map(np.testing.assert_array_equal, trainer.state.params, want)
    scanned = dataclasses.replace(cfg.model, scan_layers=True)
    loaded = hf.init_params(scanned, hf.pretrained.abstract_params(GPT(scanned)))
    model, stacked = lmflax.from_pretrained(llama_dir, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, loaded, stacked)
    ids, mask, positions = _padded_batch("left")
    np.testing.assert_allclose(
        _lmflax_logits(model, stacked, ids, mask, positions)[mask.astype(bool)],
        _lmflax_logits(GPT(cfg.model), want, ids, mask, positions)[mask.astype(bool)],
        atol=1e-5,
    )


def test_init_from_names_llama_settings_that_differ(llama_dir):
    from lmflax.config import ConfigError, load_config_file, override
    from lmflax.train import resolve

    cfg = hf.model_config(llama_dir)
    base, _ = load_config_file("gpt_tiny")
    bad = dataclasses.replace(cfg, num_kv_heads=4, rope_base=500.0, norm_eps=1e-5)
    with pytest.raises(ConfigError) as e:
        resolve(override(base, {"model": bad}))
    msg = str(e.value)
    assert "model.num_kv_heads resolves to 4" in msg and "num_key_value_heads=2" in msg
    assert "model.rope_base is 500.0" in msg and "rope_theta=10000.0" in msg
    assert "model.norm_eps is 1e-05" in msg and "rms_norm_eps=1e-06" in msg


def test_finetune_config_tiny_starts_from_its_exported_llama():
    """configs/finetune/llama_lm.py:tiny exports a random llama_tiny as a LlamaForCausalLM
    directory and fine-tunes from it: the resolved model is that preset, read back from the
    directory, with init_from pointing there."""
    from lmflax.config import load_config_file
    from lmflax.models import PRESETS
    from lmflax.train import resolve

    cfg, _ = load_config_file(str(ROOT / "configs/finetune/llama_lm.py") + ":tiny")
    cfg = resolve(cfg)
    directory = cfg.model.init_from.removeprefix("hf:")
    saved = json.loads((ROOT / directory / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]
    assert saved["rope_parameters"]["rope_type"] == "llama3"
    want = dataclasses.replace(PRESETS["llama_tiny"], head_dim=32, init_from=cfg.model.init_from)
    assert cfg.model == want


@pytest.mark.slow
def test_finetune_config_tiny_trains(data_dir, tmp_path):
    from .conftest import run_train

    out = run_train(
        [
            "--config=configs/finetune/llama_lm.py:tiny",
            f"--workdir={tmp_path}",
            "--config.train.steps=20",
            "--config.train.checkpoint_every=20",
        ],
        data_dir,
    )
    assert "done: step 20" in out.stdout
    assert "loaded 39 of 39 parameters" in out.stderr


def test_generate_config_names_bad_beam_rules():
    from lmflax.config import GenerateConfig

    errs = GenerateConfig(length_penalty_form="wu", early_stopping="maybe").validate()
    assert any("generate.length_penalty_form" in e and "'hf'" in e for e in errs), errs
    assert any("generate.early_stopping" in e and "'never'" in e for e in errs), errs
    assert GenerateConfig(length_penalty_form="hf", early_stopping="never").validate() == []
