"""GPT and BERT: properties, published parameter counts, every shipped config traced at full size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmflax import nn as lnn
from lmflax.config import load_config_file, override
from lmflax.models import GPT, PRESETS, BertForMaskedLM, BertModel
from lmflax.train import resolve

from .conftest import jitted

TINY_GPT = dataclasses.replace(
    PRESETS["gpt_tiny"], vocab_size=97, num_layers=2, d_model=32, d_ff=64, max_len=64
)
TINY_BERT = dataclasses.replace(
    PRESETS["bert_tiny"], vocab_size=97, d_model=32, d_ff=64, max_len=64
)


def _ids(B, T, V=97, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def test_gpt_is_causal():
    m = GPT(TINY_GPT)
    ids = _ids(2, 12)
    p = jitted(m, "init")(jax.random.key(0), ids, deterministic=True)
    y = jitted(m)(p, ids, deterministic=True)
    assert y.shape == (2, 12, 97)
    y2 = jitted(m)(p, ids.at[:, 7:].set(_ids(2, 5, seed=3)), deterministic=True)
    np.testing.assert_allclose(np.asarray(y[:, :7]), np.asarray(y2[:, :7]), atol=1e-5)


def test_gpt_segments_do_not_see_each_other():
    m = GPT(TINY_GPT)
    ids = _ids(1, 10)
    seg = jnp.array([[1] * 4 + [2] * 6])
    pos = jnp.array([list(range(4)) + list(range(6))])
    p = jitted(m, "init")(jax.random.key(0), ids, deterministic=True)
    packed = jitted(m)(p, ids, positions=pos, segment_ids=seg, deterministic=True)
    alone = jitted(m)(p, ids[:, 4:], deterministic=True)
    np.testing.assert_allclose(np.asarray(packed[:, 4:]), np.asarray(alone), atol=1e-5)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "none"])
def test_gpt_position_variants(position):
    cfg = dataclasses.replace(
        TINY_GPT, position=position, rope_base=10000.0 if position == "rope" else None
    )
    m = GPT(cfg)
    ids = _ids(2, 8)
    p = jitted(m, "init")(jax.random.key(0), ids, deterministic=True)
    assert ("position_embed" in p["params"]) == (position == "learned")
    y = jitted(m)(p, ids, deterministic=True)
    assert np.all(np.isfinite(np.asarray(y)))


def test_gpt_untied_head():
    m = GPT(dataclasses.replace(TINY_GPT, tie_embeddings=False))
    p = jitted(m, "init")(jax.random.key(0), _ids(1, 4), deterministic=True)
    assert "lm_head" in p["params"]


def test_bert_padding_invariance_and_outputs():
    m = BertModel(TINY_BERT)
    ids = _ids(1, 6)
    p = jitted(m, "init")(jax.random.key(0), ids, deterministic=True)
    out = jitted(m)(p, ids, jnp.ones_like(ids), deterministic=True)
    assert out.last_hidden_state.shape == (1, 6, 32) and out.pooler_output.shape == (1, 32)
    padded = jnp.concatenate([ids, _ids(1, 3, seed=5)], axis=1)
    mask = jnp.array([[1] * 6 + [0] * 3])
    out_pad = jitted(m)(p, padded, mask, deterministic=True)
    np.testing.assert_allclose(
        np.asarray(out_pad.last_hidden_state[:, :6]), np.asarray(out.last_hidden_state), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(out_pad.pooler_output), np.asarray(out.pooler_output), atol=1e-5
    )


def test_bert_mlm_head_is_tied():
    m = BertForMaskedLM(TINY_BERT)
    ids = _ids(2, 5)
    p = lnn.unbox(jitted(m, "init")(jax.random.key(0), ids, deterministic=True)["params"])
    assert set(p) == {"bert", "transform", "transform_norm", "decoder_bias"}
    assert "pooler" not in p["bert"]
    h = jitted(m)({"params": p}, ids, deterministic=True, return_hidden=True)
    logits = jitted(m)({"params": p}, ids, deterministic=True)
    table = p["bert"]["token_embed"]["embedding"]
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(h @ table.T + p["decoder_bias"]), atol=1e-5
    )


def _count(model, ids):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, deterministic=True))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lnn.unbox(shapes["params"])))


def test_published_parameter_counts():
    """GPT-2 small (vocab 50257) has 124,439,808 parameters and BertForMaskedLM (bert-base)
    109,514,298: the counts Hugging Face reports for those models."""
    ids = jnp.zeros((1, 8), jnp.int32)
    gpt2 = dataclasses.replace(PRESETS["gpt2_small"], vocab_size=50257)
    assert _count(GPT(gpt2), ids) == 124_439_808
    assert _count(BertForMaskedLM(PRESETS["bert_base"]), ids) == 109_514_298


CONFIGS = Path(__file__).parent.parent / "lmflax" / "configs"
# Configs that need an argument (a checkpoint folder, or a variant) are traced with the variants
# that need no download.
NEEDS_ARG = {
    "finetune/llama_lm": ("tiny",),
    "finetune/llama_lora": ("tiny", "8b"),
    "finetune/llama_instruct": ("tiny", "8b"),
}
SHIPPED = []
for _p in sorted(CONFIGS.rglob("*.py")):
    if _p.name.startswith("_"):
        continue
    _name = _p.relative_to(CONFIGS).with_suffix("").as_posix()
    SHIPPED += [f"{_name}:{a}" for a in NEEDS_ARG[_name]] if _name in NEEDS_ARG else [_name]


def test_every_shipped_config_is_traced():
    from lmflax.config.files import shipped_configs

    assert {s.partition(":")[0] for s in SHIPPED} == set(shipped_configs())
    assert "finetune/sst2_roberta" in SHIPPED and "gpt_tiny" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_traces_at_full_size(name):
    """Loads, validates, and traces the jitted train step with jax.eval_shape (nothing allocated)."""
    from lmflax.core.step import train_step
    from lmflax.train import Trainer

    cfg, _ = load_config_file(name)
    cfg = resolve(override(cfg, {"mesh.data": 1}))
    trainer = Trainer.create(cfg, init=False)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype)
        for k, v in trainer.task.dummy_batch(cfg.data.batch_size).items()
    }
    with trainer.context():
        new_state, metrics = jax.eval_shape(train_step, trainer.state, batch, jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, new_state.params) == jax.tree.map(
        lambda a: a.shape, trainer.state.params
    )
    assert metrics["loss"][0].shape == ()
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state.params))
    assert n > 0
