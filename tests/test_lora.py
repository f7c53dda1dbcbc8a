"""LoRA (lmflax.models.lora, lmflax.hf.adapters): only the adapters train, the frozen base stays
bit-identical, runs resume exactly after kill -9, the merged export is W + (alpha/r)·A·B, and
PEFT loads the adapter folder onto the transformers model with the same logits."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from lmflax.config import ConfigError, load_config_file, override
from lmflax.hf import adapters as hf_adapters
from lmflax.hf import from_pretrained
from lmflax.models import PRESETS, lora
from lmflax.models.config import LoraConfig
from lmflax.train import Run, Trainer, resolve
from lmflax.train.metrics import read_metrics

from .conftest import ROOT, run_train

GPT2 = dict(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48)
BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
)


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
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        base = 1.0 if name.endswith("weight") and ("LayerNorm" in name or ".ln_" in name) else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, torch, transformers) -> dict[str, Path]:
    """Tiny random transformers models saved by transformers."""
    root = tmp_path_factory.mktemp("lora_hf")
    torch.manual_seed(0)
    models = {
        "gpt2": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(**GPT2, bos_token_id=0, eos_token_id=0)
        ),
        "bert": transformers.BertForMaskedLM(transformers.BertConfig(**BERT)),
    }
    for name, model in models.items():
        _randomize(torch, model).save_pretrained(root / name)
    return {name: root / name for name in models}


def _cfg(name: str, **lora_fields):
    cfg, _ = load_config_file(name)
    updates = {"mesh.data": 1, "data.batch_size": 2, "data.seq_len": 16}
    updates.update({f"model.lora.{k}": v for k, v in lora_fields.items()})
    return override(cfg, updates)


def _hf_cfg(family: str, path: Path, **lora_fields):
    cfg = override(_cfg("gpt_tiny" if family == "gpt2" else "bert_tiny"), {"model": f"hf:{path}"})
    return override(cfg, {f"model.lora.{k}": v for k, v in lora_fields.items()})


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_adapters(state, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape) * scale, x.dtype), state.params
    )


# ---------------------------------------------------------------------------------------------
# Config and plan


def test_lora_settings_are_validated():
    with pytest.raises(ConfigError, match=r"model\.lora\.rank must be >= 0"):
        resolve(_cfg("gpt_tiny", rank=-1))
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout must be in \[0, 1\)"):
        resolve(_cfg("gpt_tiny", rank=2, dropout=1.0))
    with pytest.raises(ConfigError, match=r"model\.lora\.base_dtype is 'int4'"):
        resolve(_cfg("gpt_tiny", rank=2, base_dtype="int4"))
    with pytest.raises(ConfigError, match="not a regular expression"):
        resolve(_cfg("gpt_tiny", rank=2, targets=("attention/(query",)))
    with pytest.raises(ConfigError, match=r"rank is 0 \(LoRA off\)"):
        resolve(_cfg("gpt_tiny", alpha=4.0))
    with pytest.raises(ConfigError, match=r"match no Dense kernel.*decoder/layers_0/attention"):
        Trainer.create(_cfg("gpt_tiny", rank=2, targets=("nonexistent",)), init=False)


@pytest.mark.parametrize(
    ("config", "extra", "want"),
    [
        # GPT, unrolled: query/value of every layer; the attention output projection's input is
        # [heads, kv] (two axes).
        ("gpt_tiny", {}, {"attention/query": (1, (128,), (4, 32))}),
        ("gpt_tiny", {"model.scan_layers": True}, {"layers/attention/query": (1, (128,), (4, 32))}),
        (
            "gpt_tiny",
            {"model.lora.targets": ("attention/out",)},
            {"attention/out": (2, (4, 32), (128,))},
        ),
        ("bert_tiny", {"model.lora.targets": ("mlp/wi",)}, {"mlp/wi": (1, (128,), (512,))}),
        ("wmt14_de_en", {"model.lora.targets": ("cross_attention/query",)}, {}),
    ],
)
def test_plan_finds_the_dense_kernels_of_every_family(config, extra, want):
    cfg = _cfg(config)
    if config == "wmt14_de_en":  # the encoder-decoder, at its tiny size
        cfg = override(cfg, {"model": PRESETS["transformer_tiny"]})
    cfg = override(cfg, {"model.lora.rank": 2, **extra})
    trainer = Trainer.create(cfg, init=False)
    plan = trainer.lora_plan
    assert plan.adapted
    for spec in plan.adapted:
        assert spec.n_in + spec.lead + len(spec.out_shape) == len(spec.shape)
        for suffix, (n_in, ins, outs) in want.items():
            if spec.name.endswith(suffix):
                assert (spec.n_in, spec.in_shape, spec.out_shape) == (n_in, ins, outs)
    # Adapters carry their base kernel's logical names (and so its sharding), rank unsharded.
    shardings = trainer.state_shardings.params
    frozen = trainer.state_shardings.frozen
    for spec in plan.adapted:
        node, fnode = shardings, frozen
        for k in spec.path:
            node, fnode = node[k], fnode[k]
        kernel = fnode.get("kernel", fnode.get("kernel_int8")).spec
        a, b = node["lora_a"].spec, node["lora_b"].spec
        k = tuple(kernel) + (None,) * (len(spec.shape) - len(kernel))
        a = tuple(a) + (None,) * (len(spec.in_shape) + spec.lead + 1 - len(a))
        b = tuple(b) + (None,) * (len(spec.out_shape) + spec.lead + 1 - len(b))
        assert a == (*k[: spec.lead + spec.n_in], None)
        assert b == (*k[: spec.lead], None, *k[spec.lead + spec.n_in :])


def test_adapters_shard_like_their_kernels_on_a_mesh():
    """On 8 fake devices with fsdp=2, tensor=4: A's input axes and B's output axes are sharded
    as the base kernel's are (checked in a subprocess, which can have 8 CPU devices)."""
    code = """
import jax
from lmflax.config import load_config_file, override
from lmflax.train import Trainer
cfg, _ = load_config_file("gpt_tiny")
cfg = override(cfg, {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4, "data.batch_size": 2,
                     "model.lora.rank": 4})
t = Trainer.create(cfg, init=False)
q = t.state_shardings.params["decoder"]["layers_0"]["attention"]["query"]
k = t.state_shardings.frozen["decoder"]["layers_0"]["attention"]["query"]["kernel"]
print(tuple(k.spec), tuple(q["lora_a"].spec), tuple(q["lora_b"].spec))
"""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    import os

    out = (
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert out == "('fsdp', 'tensor', None) ('fsdp', None) (None, 'tensor', None)", out


@pytest.mark.slow
def test_a_sharded_lora_step_equals_the_one_device_step():
    """8 fake devices, fsdp=2 x tensor=4, int8 base: the same losses and adapters as 1 device
    (in a subprocess, which can have 8 CPU devices)."""
    code = """
import jax, numpy as np
from lmflax.config import load_config_file, override
from lmflax.train import Trainer
cfg, _ = load_config_file("gpt_tiny")
cfg = override(cfg, {"data.batch_size": 4, "data.seq_len": 16, "model.lora.rank": 4,
                     "model.lora.base_dtype": "int8", "optimizer.warmup_steps": 0,
                     "model.lora.targets": ("attention/(query|value|out)", "mlp/w")})
out = []
for mesh, devices in (({"mesh.data": 1}, jax.devices()[:1]),
                      ({"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4}, jax.devices())):
    t = Trainer.create(override(cfg, mesh), devices=devices)
    s, step = t.state, t.jit_train_step()
    rng = np.random.default_rng(0)
    b = t.task.dummy_batch(4)
    b["inputs"] = rng.integers(0, 100, b["inputs"].shape).astype(np.int32)
    b["targets"] = np.roll(b["inputs"], -1, axis=1)
    losses = []
    with t.context():
        for i in range(3):
            s, m = step(s, t.global_batch(b), jax.random.key(i))
            losses.append(float(m["loss"][0]))
    q = s.params["decoder"]["layers_0"]["attention"]["query"]["lora_b"]
    out.append((losses, np.asarray(jax.device_get(s.params["decoder"]["layers_1"]["mlp"]["wo"]["lora_a"])),
                len(q.sharding.device_set)))
(l1, a1, n1), (l8, a8, n8) = out
assert (n1, n8) == (1, 8), (n1, n8)
np.testing.assert_allclose(l1, l8, rtol=1e-5)
np.testing.assert_allclose(a1, a8, rtol=1e-4, atol=1e-6)
print("ok", l1, l8)
"""
    import os

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Training: only the adapters


@pytest.mark.parametrize("base_dtype", ["param", "int8"])
def test_a_lora_run_trains_only_the_adapters(base_dtype):
    cfg = _cfg(
        "gpt_tiny",
        rank=4,
        base_dtype=base_dtype,
        dropout=0.1,
        targets=("attention/(query|value)", "mlp/wo"),
    )
    cfg = override(cfg, {"optimizer.warmup_steps": 0, "optimizer.learning_rate": 1e-2})
    trainer = Trainer.create(cfg)
    state = trainer.state
    full = Trainer.create(
        override(
            cfg,
            {
                "model.lora.rank": 0,
                "model.lora.dropout": 0.0,
                "model.lora.base_dtype": "param",
                "model.lora.targets": LoraConfig().targets,
            },
        ),
        init=False,
    )
    n_model = _count(full.state.params)
    n_adapters = _count(state.params)
    plan = trainer.lora_plan
    r = 4
    want = sum(r * (int(np.prod(s.in_shape)) + int(np.prod(s.out_shape))) for s in plan.adapted)
    assert n_adapters == want and n_adapters < n_model // 20
    # AdamW's state: mu and nu for each adapter value, plus step counters; nothing else.
    opt = jax.tree.leaves(state.opt_state)
    assert sum(int(np.prod(x.shape)) for x in opt if x.ndim) == 2 * n_adapters
    assert (
        all(x.size == 1 for x in opt if not x.ndim) and _count(state.opt_state) < 2 * n_adapters + 4
    )
    assert _count(state.frozen) >= n_model
    if base_dtype == "int8":
        kernels = [x for p, x in lora.flatten(state.frozen).items() if p[-1] == lora.INT8]
        assert kernels and all(k.dtype == jnp.int8 for k in kernels)

    frozen_before = [np.asarray(x).copy() for x in jax.tree.leaves(state.frozen)]
    adapters_before = [np.asarray(x).copy() for x in jax.tree.leaves(state.params)]
    step = trainer.jit_train_step()
    rng = np.random.default_rng(0)
    batch = trainer.task.dummy_batch(2)
    batch["inputs"] = rng.integers(0, 100, batch["inputs"].shape).astype(np.int32)
    batch["targets"] = np.roll(batch["inputs"], -1, axis=1)
    losses = []
    with trainer.context():
        for i in range(4):
            state, metrics = step(state, trainer.global_batch(batch), jax.random.key(i))
            losses.append(float(metrics["loss"][0] / metrics["loss"][1]))
    assert losses[-1] < losses[0]
    for a, b in zip(frozen_before, jax.tree.leaves(state.frozen)):
        assert a.tobytes() == np.asarray(b).tobytes()
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(adapters_before, jax.tree.leaves(state.params))
    ]
    assert all(changed)


def test_fresh_adapters_leave_the_model_as_the_base():
    trainer = Trainer.create(_cfg("gpt_tiny", rank=2))
    base = jax.jit(
        lambda r: nn.meta.unbox(trainer.task.init(r, trainer.task.dummy_batch(1))["params"])
    )(trainer.init_rng)
    merged = trainer.model_params(trainer.state)
    jax.tree.map(np.testing.assert_array_equal, merged, jax.tree.map(np.asarray, base))


# ---------------------------------------------------------------------------------------------
# Export


def _conv1d_reference(w, deltas):
    """GPT-2's Conv1D c_attn [D, 3·D] plus per-projection updates (None = none)."""
    out = np.array(w, np.float64)
    D = out.shape[0]
    for j, d in enumerate(deltas):
        if d is not None:
            out[:, j * D : (j + 1) * D] += d
    return out


@pytest.mark.parametrize("base_dtype", ["param", "int8"])
def test_merged_export_is_w_plus_scaled_ba(hf_dirs, base_dtype, tmp_path):
    path = hf_dirs["gpt2"]
    alpha, r = 6.0, 2
    cfg = _hf_cfg(
        "gpt2",
        path,
        rank=r,
        alpha=alpha,
        base_dtype=base_dtype,
        targets=("attention/(query|value)", "mlp/wo"),
    )
    trainer = Trainer.create(cfg)
    state = trainer.state.replace(params=_random_adapters(trainer.state))
    out = hf_adapters.save_merged(
        trainer.cfg.model, trainer.lora_plan, state.frozen, state.params, tmp_path / "merged"
    )
    got = load_file(str(out / "model.safetensors"))
    base = load_file(str(path / "model.safetensors"))
    ad = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(state.params))
    frozen = jax.device_get(state.frozen)
    s = alpha / r
    D = GPT2["n_embd"]

    def stored(module, original):
        """The frozen kernel as stored (int8: dequantised, within half a step of the original
        per output channel), in float64, shaped like `original`."""
        if base_dtype != "int8":
            return np.asarray(original, np.float64)
        q = np.asarray(module["kernel_int8"], np.float64).reshape(original.shape[0], -1)
        scale = np.asarray(module["kernel_scale"], np.float64).reshape(1, -1)
        assert np.all(np.abs(q * scale - original) <= scale / 2 + 1e-7)
        return q * scale

    for i in range(GPT2["n_layer"]):
        layer = ad["decoder"][f"layers_{i}"]
        fl = frozen["decoder"][f"layers_{i}"]["attention"]
        att = layer["attention"]
        name = f"transformer.h.{i}.attn.c_attn.weight"
        c_attn = np.concatenate(
            [
                stored(fl[p], base[name][:, j * D : (j + 1) * D])
                for j, p in enumerate(("query", "key", "value"))
            ],
            axis=1,
        )
        q_delta = s * att["query"]["lora_a"] @ att["query"]["lora_b"].reshape(r, D)
        v_delta = s * att["value"]["lora_a"] @ att["value"]["lora_b"].reshape(r, D)
        want = _conv1d_reference(c_attn, [q_delta, None, v_delta])
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6)
        name = f"transformer.h.{i}.mlp.c_proj.weight"
        wo = layer["mlp"]["wo"]
        c_proj = stored(frozen["decoder"][f"layers_{i}"]["mlp"]["wo"], base[name])
        want = c_proj + s * wo["lora_a"] @ wo["lora_b"]
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6)
        # Untargeted weights: the base as stored.
        name = f"transformer.h.{i}.mlp.c_fc.weight"
        c_fc = stored(frozen["decoder"][f"layers_{i}"]["mlp"]["wi"], base[name])
        np.testing.assert_allclose(got[name], c_fc, rtol=1e-6, atol=1e-7)


def _lmflax_logits(path, merged, ids, **overrides):
    module, _ = from_pretrained(path, **overrides)
    return np.asarray(module.apply({"params": merged}, ids, deterministic=True))


@pytest.mark.parametrize(
    ("family", "targets", "scan"),
    [
        ("gpt2", ("attention/(query|value)", "mlp/(wi|wo)", "attention/out"), False),  # Conv1D
        ("gpt2", ("attention/(query|value)",), True),  # stacked layers, unrolled for PEFT
        ("bert", ("attention/(query|key|value)", "attention/out", "mlp/wo", "transform"), False),
    ],
)
def test_peft_loads_the_adapter_folder_with_the_same_logits(
    hf_dirs, family, targets, scan, tmp_path, torch, transformers
):
    import peft

    path = hf_dirs[family]
    cfg = _hf_cfg(family, path, rank=3, alpha=5.0, targets=targets)
    cfg = override(cfg, {"model.scan_layers": scan})
    trainer = Trainer.create(cfg)
    state = trainer.state.replace(params=_random_adapters(trainer.state, scale=0.5))
    merged = trainer.model_params(state)
    out = hf_adapters.save_peft_adapter(
        trainer.cfg.model,
        trainer.lora_plan,
        merged,
        state.params,
        tmp_path / "adapter",
        base_model_name_or_path=str(path),
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3
    names = load_file(str(out / "adapter_model.safetensors"))
    assert all(n.startswith("base_model.model.") for n in names)
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.BertForMaskedLM
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(path), out).eval()
    V = GPT2["vocab_size"] if family == "gpt2" else BERT["vocab_size"]
    ids = np.random.default_rng(1).integers(0, V, (2, 12)).astype(np.int32)
    want = model(input_ids=torch.tensor(ids.astype(np.int64))).logits.numpy()
    base = cls.from_pretrained(path).eval()(input_ids=torch.tensor(ids.astype(np.int64)))
    got = _lmflax_logits(path, merged, ids, scan_layers=scan)
    assert np.max(np.abs(want - base.logits.numpy())) > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Resume after kill -9


STEPS = 64  # enough that a kill right after checkpoint 8 lands well before the end
TINY = [
    "--config.data.seq_len=32",
    "--config.data.batch_size=4",
    "--config.train.sample_tokens=0",
    "--config.data.eval_split=",
    "--config.train.log_every=1",
    "--config.model.lora.rank=4",
    "--config.model.lora.dropout=0.1",
    "--config.model.lora.targets=('attention/(query|value)', 'mlp/wo')",
    "--config.optimizer.warmup_steps=2",
    f"--config.train.steps={STEPS}",
    "--config.train.checkpoint_every=8",
]


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl")}


def _state(step_dir: Path) -> dict:
    return ocp.PyTreeCheckpointer().restore(step_dir / "state")


@pytest.mark.slow
@pytest.mark.parametrize("base", ["init_from", "random"])
def test_a_lora_run_resumes_exactly_after_kill(base, hf_dirs, data_dir, tmp_path):
    """STEPS steps straight vs kill -9 after checkpoint 8 + the rest: identical losses, bit-identical
    adapters. A base from model.init_from is not in the checkpoints (it is read again); a random
    base is."""
    import os
    import time

    # model=hf:DIR replaces the whole model section, so it comes before the lora settings.
    if base == "init_from":
        args = [f"--config.model=hf:{hf_dirs['gpt2']}"]
    else:
        args = ["--config.model.num_layers=2", "--config.model.d_model=32"]
    args += [*TINY, "--config.model.lora.base_dtype=int8"]
    straight = tmp_path / "straight"
    run_train([f"--workdir={straight}", *args], data_dir)
    killed = tmp_path / "killed"
    env = {**os.environ, "TFDS_DATA_DIR": data_dir, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), f"--workdir={killed}", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "8" / "lmflax_checksums.json").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 8 <= max(_losses(killed)) < STEPS, "the run ended before it was killed"
    resumed = run_train([f"--workdir={killed}", *args], data_dir)
    at = re.search(r"resumed from .* at step (\d+)", resumed.stderr)
    assert at and 8 <= int(at.group(1)) < STEPS, resumed.stderr[-2000:]
    assert _losses(killed) == _losses(straight)
    a, b = (_state(w / "checkpoints" / str(STEPS)) for w in (killed, straight))
    assert ("frozen" in a) == (base == "random")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    # Only adapters (and their optimizer state) were trained and saved.
    names = {p[-1] for p in lora.flatten(a["params"])}
    assert names == {"lora_a", "lora_b"}
    if base == "init_from":
        _check_run_exports(killed, hf_dirs["gpt2"], tmp_path)


def _check_run_exports(workdir: Path, base_dir: Path, tmp_path: Path) -> None:
    """The trained run's PEFT folder, loaded by peft onto the base, and its merged export,
    loaded by transformers, both give lmflax's logits (of the int8-trained adapters on the
    quantised base for the merged export)."""
    import peft
    import torch
    import transformers

    run = Run.open(workdir, local_devices=True)
    ids = np.random.default_rng(2).integers(0, GPT2["vocab_size"], (2, 12)).astype(np.int32)
    t_ids = torch.tensor(ids.astype(np.int64))
    with torch.no_grad():
        merged_dir = run.export_hf(tmp_path / "merged")
        merged = transformers.GPT2LMHeadModel.from_pretrained(merged_dir).eval()
        np.testing.assert_allclose(
            merged(input_ids=t_ids).logits.numpy(),
            _lmflax_logits(base_dir, run.params, ids),
            atol=1e-4,
            rtol=0,
        )
        adapter = run.export_peft(tmp_path / "adapter")
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base_dir.resolve())
        # On the merged directory's base (the quantised one lmflax trained against), with its
        # own adapters removed: PEFT must reproduce the run.
        zero = run.state.replace(params=jax.tree.map(jnp.zeros_like, run.state.params))
        quantised = hf_adapters.save_merged(
            run.cfg.model, run.trainer.lora_plan, zero.frozen, zero.params, tmp_path / "base"
        )
        model = peft.PeftModel.from_pretrained(
            transformers.GPT2LMHeadModel.from_pretrained(quantised), adapter
        ).eval()
        np.testing.assert_allclose(
            model(input_ids=t_ids).logits.numpy(),
            _lmflax_logits(base_dir, run.params, ids),
            atol=1e-4,
            rtol=0,
        )


def test_a_model_section_set_after_its_lora_keys_is_refused():
    """`model.lora.rank=8 model=hf:DIR` would silently train without LoRA."""
    from lmflax.config import apply_overrides

    cfg, _ = load_config_file("gpt_tiny")
    with pytest.raises(
        ConfigError,
        match=r"model=bert_tiny replaces the whole model section.*"
        r"model\.lora\.rank=\.\.\.; put model=\.\.\. first",
    ):
        apply_overrides(cfg, ["model.lora.rank=8", "model=bert_tiny"])
    ok = apply_overrides(cfg, ["model=bert_tiny", "model.lora.rank=8"])
    assert ok.model.family == "bert" and ok.model.lora.rank == 8


@pytest.mark.slow
def test_resuming_on_a_changed_base_is_refused(hf_dirs, data_dir, tmp_path):
    """Checkpoints reference the init_from base by its files' SHA-256: a base whose weights
    changed since is a config error (exit 2), not adapters silently applied to other weights."""
    import shutil

    from safetensors.numpy import save_file

    base = tmp_path / "base"
    shutil.copytree(hf_dirs["gpt2"], base)
    args = [
        f"--workdir={tmp_path / 'run'}",
        f"--config.model=hf:{base}",
        *TINY[:-2],
        "--config.train.steps=4",
    ]
    run_train(args, data_dir)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert set(meta["lora_base"]["files"]) == {"config.json", "model.safetensors"}
    again = run_train(args, data_dir)  # the same base: resumes (and finds the run complete)
    assert "resumed from" in again.stderr
    tensors = load_file(str(base / "model.safetensors"))
    name = "transformer.h.0.attn.c_attn.weight"
    tensors[name] = tensors[name] + np.float32(1e-3)
    save_file(tensors, str(base / "model.safetensors"), {"format": "pt"})
    proc = run_train(args, data_dir, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "holds LoRA adapters trained on the base" in proc.stderr
    assert "model.safetensors" in proc.stderr


def test_the_llama_lora_config_adapts_every_projection_of_a_llama():
    """finetune/llama_lora:tiny: LoRA on a Llama-family GPT (GQA, SwiGLU's gate, untied head):
    every attention and MLP kernel gets adapters, only they train, the bf16 base stays put."""
    cfg, _ = load_config_file("finetune/llama_lora:tiny")
    cfg = override(cfg, {"mesh.data": 1, "data.batch_size": 2, "data.seq_len": 16})
    trainer = Trainer.create(cfg)
    state = trainer.state
    names = {"/".join(s.path[-2:]) for s in trainer.lora_plan.adapted}
    want = {f"attention/{n}" for n in ("query", "key", "value", "out")}
    assert names == want | {f"mlp/{n}" for n in ("wi", "wi_gate", "wo")}
    r = cfg.model.lora.rank
    n_adapters = sum(
        r * (int(np.prod(s.in_shape)) + int(np.prod(s.out_shape)))
        for s in trainer.lora_plan.adapted
    )
    assert _count(state.params) == n_adapters
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.frozen))
    frozen_before = [np.asarray(x).copy() for x in jax.tree.leaves(state.frozen)]
    step = trainer.jit_train_step()
    batch = trainer.task.dummy_batch(2)
    rng = np.random.default_rng(0)
    batch["inputs"] = rng.integers(0, 100, batch["inputs"].shape).astype(np.int32)
    batch["targets"] = np.roll(batch["inputs"], -1, axis=1)
    with trainer.context():
        for i in range(3):
            state, _ = step(state, trainer.global_batch(batch), jax.random.key(i))
    for a, b in zip(frozen_before, jax.tree.leaves(state.frozen)):
        assert a.tobytes() == np.asarray(b).tobytes()


def test_a_run_is_planned_from_config_json_alone_and_refused_training_without_weights(
    tmp_path, capsys
):
    """`lmflax plan` on a checkpoint folder holding only config.json (the weights not yet
    downloaded) reports what it reports with the weights; `lmflax train` on it is exit 2 naming
    the missing files, before a workdir exists."""
    import shutil

    from lmflax import cli
    from lmflax.configs.finetune import tiny_llama_checkpoint

    full = tiny_llama_checkpoint()
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(full / "config.json", bare / "config.json")
    reports = []
    for directory in (full, bare):
        assert cli.main(["plan", f"--config=finetune/llama_lora:{directory}"]) == 0
        out = capsys.readouterr().out
        reports.append(
            [line for line in out.splitlines() if "parameters" in line or "base" in line]
        )
    assert reports[0] == reports[1] and any("frozen base" in line for line in reports[0])
    work = tmp_path / "run"
    assert cli.main(["train", f"--config=finetune/llama_lora:{bare}", f"--workdir={work}"]) == 2
    err = capsys.readouterr().err
    assert f"model.init_from: no weights in {bare}" in err and "model.safetensors" in err
    assert not work.exists()
