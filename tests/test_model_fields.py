"""Every model config field does something: set to a non-default value, it changes what the model
computes or its parameters (seen in the traced init and loss-gradient programs, their constants
and shapes), or the config is refused, or (for word2vec's data settings) the data pipeline reads
it. An ignored field fails here. Tracing only: nothing is compiled."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from lmflax.config import ConfigError, load_config_file, override
from lmflax.models import PRESETS, BertConfig, BertModel, ModelConfig
from lmflax.models.config import LoraConfig
from lmflax.tasks import make_task
from lmflax.train import resolve

ROOT = Path(__file__).resolve().parent.parent

# family -> (config file, tiny preset, model fields to set first so every field has a use)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt": ("gpt_tiny", "gpt_tiny", {}),
    "bert": ("bert_tiny", "bert_tiny", {}),
    "roberta": ("finetune/sst2_roberta", "roberta_tiny", {}),
    "seq2seq": ("wmt14_de_en", "transformer_tiny", {}),
    "t5": ("cnn_dailymail", "t5_tiny", {}),
    "word2vec": ("word2vec", "word2vec_tiny", {}),
}

# A non-default value per field (family-specific where the default differs), and the fields it
# needs set alongside to be meaningful.
ROPE = {"position": "rope", "rope_base": 10000.0}
LLAMA3 = {**ROPE, "rope_scaling": "llama3", "rope_scaling_factor": 8.0}


def variants(family: str, base: Any) -> dict[str, tuple[Any, dict[str, Any]]]:
    """field -> (value to try, other fields set in both the baseline and the variant)."""
    flip = {"layernorm": "rmsnorm", "rmsnorm": "layernorm", "pre": "post", "post": "pre"}
    out: dict[str, tuple[Any, dict[str, Any]]] = {
        "num_layers": (base.num_layers + 1, {}),
        "d_model": (base.d_model * 2, {}),
        "num_heads": (base.num_heads * 2, {}),
        "num_kv_heads": (1, {}),
        "head_dim": (8, {}),
        "d_ff": (base.d_ff * 2, {}),
        "activation": ("silu" if base.activation != "silu" else "relu", {}),
        "norm": (flip[base.norm], {}),
        "norm_eps": (1e-3, {}),
        "norm_position": (flip[base.norm_position], {}),
        "use_bias": (not base.use_bias, {}),
        "dropout_rate": (0.3, {}),
        "attention_dropout_rate": (0.3, {}),
        "rope_base": (500.0, ROPE),
        "rope_fraction": (0.5, ROPE),
        "rope_scaling": ("linear", ROPE),
        "rope_scaling_factor": (2.0, {**ROPE, "rope_scaling": "linear"}),
        "rope_low_freq_factor": (2.0, LLAMA3),
        "rope_high_freq_factor": (8.0, LLAMA3),
        "rope_original_max_len": (64, LLAMA3),
        "qkv_bias": (not base.use_bias, {}),
        "out_bias": (not base.use_bias, {}),
        "sliding_window": (4, {}),
        # cuDNN cannot run on a CPU: the attention dispatch refusing it shows the field arrives.
        "attention_impl": ("cudnn", {}),
        "init_std": (0.05, {}),
        "scale_residual_init": (not base.scale_residual_init, {}),
        "scan_layers": (True, {}),
        "remat": ("full", {}),
        "fused_qkv": (True, {}),
        "dtype": ("bfloat16", {}),
        "param_dtype": ("bfloat16", {}),
        "vocab_size": (base.vocab_size * 2, {}),
        "max_len": (base.max_len * 2, {"position": "learned"}),
        "position": ("none" if base.position != "none" else "learned", {}),
        "tie_embeddings": (not base.tie_embeddings, {}),
        "init_from": ("hf:/nonexistent/lmflax-model", {}),
        # LoRA changes what is trained, not the model: checked on the trainer (TRAINER_FIELDS).
        "lora": (LoraConfig(rank=2, targets=("query",)), {}),
        # BERT
        "type_vocab_size": (3, {}),
        "add_pooler": (False, {}),
        # RoBERTa
        "pad_token_id": (0, {}),
        # encoder-decoders
        "num_decoder_layers": (base.num_layers + 1, {}),
        "relative_buckets": (16, {"position": "relative"}),
        "relative_max_distance": (64, {"position": "relative"}),
        "scale_embeddings": (not getattr(base, "scale_embeddings", False), {}),
        "scale_logits": (not getattr(base, "scale_logits", False), {}),
        "sinusoidal_layout": ("halves", {"position": "sinusoidal"}),
        "embed_norm": (True, {}),
        "logits_bias": (True, {}),
        # word2vec
        "architecture": ("cbow", {}),
        "window": (2, {}),
        "negatives": (3, {}),
        "min_count": (2, {}),
        "sample": (0.0, {}),
        "ns_exponent": (0.5, {}),
        "lowercase": (False, {}),
    }
    if family in ("bert", "roberta"):
        out["max_len"] = (base.max_len * 2, {})
    return out


# Fields a family refuses to take a non-default value for (validation says so, by name).
REFUSED: dict[str, set[str]] = {
    "gpt": {"init_from"},  # refused here only because the directory does not exist
    "bert": {
        "init_from",
        "rope_base",
        "rope_fraction",
        "rope_scaling",
        "rope_scaling_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_max_len",
        "position",
        "tie_embeddings",
        "sliding_window",
    },
    "roberta": {
        "init_from",
        "rope_base",
        "rope_fraction",
        "rope_scaling",
        "rope_scaling_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_max_len",
        "position",
        "tie_embeddings",
        "sliding_window",
    },
    "seq2seq": {"init_from"},
    "t5": {"init_from"},
    # word2vec is no Transformer: every shared setting but these must keep its default.
    "word2vec": {f.name for f in dataclasses.fields(ModelConfig)}
    - {"d_model", "vocab_size", "dtype", "param_dtype"},
}
# Settings of what is trained rather than what the model computes: each must change the train
# state (LoRA: adapters as the trained parameters, the base frozen).
TRAINER_FIELDS = {"lora"}
# word2vec settings that shape the training examples rather than the model: each must be read
# by the data pipeline or the task.
DATA_FIELDS = {"word2vec": {"window", "min_count", "sample", "ns_exponent", "lowercase"}}


def _config(family: str, updates: dict[str, Any]) -> Any:
    config_file, preset, extra = FAMILIES[family]
    cfg, _ = load_config_file(config_file)
    model = dataclasses.replace(PRESETS[preset], **extra, **updates)
    return override(cfg, {"model": model, "mesh.data": 1})


def _digest(tree: Any) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf)
        h.update(str((a.shape, a.dtype)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@functools.cache
def _signature(cfg: Any) -> tuple[str, ...]:
    """What the model computes, as traced programs (their text shows shapes, dtypes and literal
    settings; constants are hashed): init, and the loss with dropout on. For BERT also the bare
    encoder (`BertModel`, which the task heads wrap with their own pooler choice)."""
    task = make_task(resolve(cfg))
    batch = task.dummy_batch(2)
    rng = jax.random.key(0)
    programs = []
    try:
        init = jax.make_jaxpr(lambda r: task.init(r, batch))(rng)
        params = jax.eval_shape(lambda r: task.init(r, batch), rng)["params"]
        loss = jax.make_jaxpr(lambda p, b, r: task.loss(p, b, r, False)[0])(
            params, batch, jax.random.key(1)
        )
        programs += [init, loss]
        if isinstance(cfg.model, BertConfig):
            ids = np.zeros((2, 8), np.int32)
            bare = BertModel(cfg.model)
            programs.append(jax.make_jaxpr(lambda r: bare.init(r, ids, deterministic=True))(rng))
    except (ValueError, NotImplementedError) as e:
        return ("refused while tracing", type(e).__name__)
    return tuple(x for p in programs for x in (str(p), _digest(p.consts)))


def _families_fields() -> list[tuple[str, str]]:
    out = []
    for family, (_, preset, _) in FAMILIES.items():
        for f in dataclasses.fields(PRESETS[preset]):
            out.append((family, f.name))
    return out


@pytest.mark.parametrize(("family", "field"), _families_fields())
def test_every_model_field_changes_the_model_or_is_refused(family, field):
    preset = PRESETS[FAMILIES[family][1]]
    table = variants(family, preset)
    assert field in table, f"add a non-default value for model.{field} to this test"
    value, alongside = table[field]
    assert value != getattr(preset, field) or alongside, f"{field}: {value!r} is the default"
    base_cfg = _config(family, alongside)
    variant_cfg = _config(family, {**alongside, field: value})
    if field in REFUSED[family]:
        with pytest.raises(ConfigError, match=r"model\."):
            resolve(variant_cfg)
        return
    if field in TRAINER_FIELDS:
        from lmflax.train import Trainer

        def shapes(cfg: Any) -> Any:
            state = Trainer.create(resolve(cfg), init=False).state
            return jax.tree.map(lambda x: (x.shape, str(x.dtype)), (state.params, state.frozen))

        assert shapes(variant_cfg) != shapes(base_cfg), f"model.{field} changes no train state"
        return
    if field in DATA_FIELDS.get(family, ()):
        sources = [
            p.read_text() for d in ("data", "tasks") for p in (ROOT / "lmflax" / d).glob("*.py")
        ]
        assert any(f".{field}" in s for s in sources), f"model.{field} is read nowhere"
        resolve(variant_cfg)
        return
    assert _signature(variant_cfg) != _signature(base_cfg), (
        f"model.{field}={value!r} changes nothing the {family} model computes"
    )


def test_rope_fraction_below_one_changes_the_output():
    """The defect this test file was written for: rope_fraction reached no layer."""
    half = _config("gpt", {**ROPE, "rope_fraction": 0.5})
    full = _config("gpt", {**ROPE})
    outs = []
    # Large weights, so that attention is far from uniform and positions matter.
    half, full = (override(c, {"model.init_std": 0.5}) for c in (half, full))
    for cfg in (half, full):
        task = make_task(resolve(cfg))
        batch = task.dummy_batch(2)
        T = batch["inputs"].shape[1]
        batch["inputs"] = np.arange(2 * T, dtype=np.int32).reshape(2, T) % 50
        batch["positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
        variables = task.init(jax.random.key(0), batch)
        outs.append(float(task.loss(variables["params"], batch, jax.random.key(1), True)[0]))
    assert abs(outs[0] - outs[1]) > 1e-6
