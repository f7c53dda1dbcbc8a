"""The NVIDIA GPU path without a GPU: lmflax's real train step compiled by XLA:GPU for an H200
described to it (jax's CUDA plugin and the cuDNN library are installed by the test extra; no
device or driver is needed), and the optimised HLO read back.

It checks what a GPU run depends on and a CPU run cannot show: the dispatch picks cuDNN flash
attention for a GPU it has never seen, in its causal mode without a materialised mask on whole
sequences and with the segment mask as a bias on packed ones; the donated train state is
updated in place (no copy of any state array per step); and the planner sizes a step for a
GPU topology."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.gpu_compile import compile_lmflax, hlo_summary
from lmflax.config import Config, ConfigError, override
from lmflax.models import PRESETS
from lmflax.train import plan, resolve

pytestmark = pytest.mark.skipif(
    not plan.cuda_plugin_installed(),
    reason="jax's CUDA plugin is not installed (pip install -e '.[test]' installs it)",
)


def _cfg(**model: object) -> Config:
    base = dataclasses.replace(
        PRESETS["gpt_tiny"],
        num_layers=2,
        d_model=128,
        num_heads=4,
        d_ff=256,
        vocab_size=512,
        dtype="bfloat16",
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )
    return resolve(
        override(
            Config(model=dataclasses.replace(base, **model)),
            {"data.batch_size": 4, "data.seq_len": 128},
        )
    )


def _compiled_hlo(cfg: Config, *, packed: bool) -> tuple[str, object]:
    compiled = compile_lmflax(cfg, plan.gpu_topology_devices("h200"), packed=packed)
    return compiled.as_text(), compiled


def test_gpt_step_uses_cudnn_causal_mode_and_updates_state_in_place():
    hlo, compiled = _compiled_hlo(_cfg(), packed=False)
    s = hlo_summary(hlo)
    # Forward and backward for each of the 2 layers, no bias operand (causal mode, no mask).
    assert s["library_calls"].get("__cudnn$fmhaSoftmax") == 2, s
    assert s["library_calls"].get("__cudnn$fmhaSoftmaxBackward") == 2, s
    assert s["cudnn_attention_with_bias"] == 0, s
    # Donation: every state array is an input aliased to an output and no step copies one.
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes > 0
    n_state = len(
        [ln for ln in hlo.splitlines() if " copy(" in ln and ("f32[128" in ln or "f32[512" in ln)]
    )
    assert n_state == 0, "state arrays are copied each step instead of updated in place"
    assert s["copies"] < 10, s
    # AdamW reads gradients, parameters, mu and nu and writes the last three: at least 7 × 4
    # bytes per parameter go through the kernels the estimate counts.
    n_params = mem.alias_size_in_bytes // (3 * 4)  # params, mu, nu (float32) are donated
    assert s["kernel_bytes"] >= 7 * 4 * n_params, s


def test_packed_gpt_step_passes_segments_to_cudnn_as_a_bias():
    hlo, _ = _compiled_hlo(_cfg(), packed=True)
    s = hlo_summary(hlo)
    assert s["cudnn_attention"] == 4 and s["cudnn_attention_with_bias"] == 4, s


def test_float32_model_falls_back_to_xla_attention_on_the_gpu(caplog):
    caplog.set_level("DEBUG", logger="lmflax.attention")
    hlo, _ = _compiled_hlo(_cfg(dtype="float32"), packed=False)
    assert hlo_summary(hlo)["cudnn_attention"] == 0
    assert "float32" in caplog.text  # the dispatch says which constraint failed


def test_planner_sizes_a_sharded_step_for_eight_gpus():
    cfg = override(_cfg(), {"mesh.data": 2, "mesh.fsdp": 4, "data.batch_size": 8})
    p, report = plan.main(resolve(cfg), topology="h200:8")
    assert p.devices == 8 and p.device_kind == "NVIDIA H200"
    assert "fits the h200 chip's" in report
    assert 0 < p.param_bytes < p.params * 4  # fsdp shards the float32 parameters


def test_gpu_topology_names_are_checked():
    with pytest.raises(ConfigError, match="positive integer"):
        plan.topology_devices("h200:zero")


def test_gpu_compile_benchmark_reads_a_bert_step(capsys):
    from benchmarks import gpu_compile

    devices = plan.gpu_topology_devices("h100")
    compiled = gpu_compile.lmflax_step(
        "benchmarks/bench_configs/tiny.py:bert", [], devices, packed=True
    )
    s = gpu_compile.hlo_summary(compiled.as_text())
    # BERT's padding mask reaches cuDNN as a bias; 2 layers, forward and backward.
    assert s["cudnn_attention"] == 4 and s["cudnn_attention_with_bias"] == 4, s
    assert s["launches"] > s["fusions"] > 0
