"""The benchmark harness at tiny sizes on CPU (the CI smoke test): a real train step is compiled,
timed and reported; the side-by-side summary computes ratios and judges the targets."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import attention, common, side_by_side, train_throughput


def test_train_throughput_reports_a_real_step(capsys):
    cfg, name = common.load_config(
        "benchmarks/bench_configs/tiny.py:gpt", ["model.fused_qkv=true", "task.loss_chunk_size=16"]
    )
    record = train_throughput.run(cfg, name=name, steps=3, warmup=1, matmul_n=128)
    assert record["what"] == "lmflax" and record["platform"] == "cpu"
    assert record["batch"] == 4 and record["seq"] == 64
    assert record["compile_s"] > 0 and record["trace_s"] > 0
    assert 0 < record["step_ms_min"] <= record["step_ms"] <= record["step_ms_max"]
    assert record["tokens_s"] == pytest.approx(4 * 64 / record["step_ms"] * 1e3)
    assert record["donated"] is True  # the old state's buffers were handed to the new state
    assert math.isfinite(record["loss"]) and record["loss"] > 0
    assert record["mfu"] is None  # no datasheet peak for a CPU ...
    assert record["mfu_measured"] > 0  # ... but a measured matmul rate
    assert record["attention"] == ["attention: xla (not fused: no fused kernel for backend 'cpu')"]
    assert record["compiled_memory_gib"]["temp"] > 0
    assert record["knobs"]["fused_qkv"] and record["knobs"]["loss_chunk_size"] == 16
    table = train_throughput.markdown_table([record])
    assert table.splitlines()[2].startswith(f"| {name} | cpu | 4 | 64 |")


def test_attention_bench_times_or_explains():
    shape = dict(batch=1, seq=16, heads=2, kv_heads=2, head_dim=8, dtype="float32", packed=True)
    ok = attention.bench("xla", **shape, causal=True, steps=2)
    assert ok["fwd_ms"] > 0 and ok["fwd_bwd_ms"] > 0
    refused = attention.bench("cudnn", **shape, causal=True, steps=2)
    assert "needs an NVIDIA GPU" in refused["error"]


def test_side_by_side_summary_ratios_and_targets(tmp_path):
    lm = {"what": "lmflax", "device_kind": "NVIDIA H200", "seq": 1024, "mfu": 0.41}
    records = [
        {**lm, "name": "lmflax_gpt2_124m", "batch": 32, "tokens_s": 650_000.0},
        {**lm, "name": "lmflax_bert_base_mlm", "batch": 128, "seq": 128, "tokens_s": 600_000.0},
        {"what": "plain_flax_gpt2_124m_b32", "batch": 32, "seq": 1024, "tokens_s": 500_000.0},
        {"what": "compile_time_ratio", "layers": [24, 2], "ratio": 1.2},
        {"what": "attention", "impl": "cudnn", "seq": 512, "speedup_fwd_bwd_vs_xla": 3.0},
        {"what": "attention", "impl": "cudnn", "seq": 2048, "speedup_fwd_bwd_vs_xla": 5.0},
    ]
    anchors = [
        {"what": "plain_flax_bert_base_mlm", "batch": 128, "seq": 128, "tokens_s": 400_000.0},
        {
            "what": "plain_flax_bert_base_mlm",
            "token_types": "onehot",
            "batch": 128,
            "seq": 128,
            "tokens_s": 500_000.0,
        },
    ]
    text = side_by_side.summarize(
        records, anchors, [{"job": "x", "status": "exit 0", "seconds": 1}]
    )
    assert "| GPT-2 small | plain Flax (cuDNN) | 32 × 1024 | 500,000 |  | 1.30 |" in text
    # Peers missing from this run come from the anchors, labelled as such, matched exactly.
    assert "plain Flax (one-hot token types) (anchor 2026-11-28, not this run)" in text
    assert "| 128 × 128 | 500,000 |  | 1.20 |" in text
    assert "GPT-2 small ≥ 600,000 tokens/s: 650,000 — met" in text
    assert "BERT-base MLM ≥ 620,000 tokens/s: 600,000 — NOT met" in text
    assert "1.3B GPT ≥ 50% MFU of 989 TFLOP/s: not measured" in text
    assert "24-layer compile ≤ 1.5× the 2-layer (scan_layers): 1.20× — met" in text
    assert "slowest case): 3.00× XLA's speed — met" in text
    # Jobs run in order, stop when the budget runs out, and land in results.jsonl.
    jobs = [
        side_by_side.Job("echo", 5, ["python", "-c", 'print(\'{"what": "x", "v": 1}\')']),
        side_by_side.Job("too_long", 1e6, ["python", "-c", "pass"]),
    ]
    status = side_by_side.run_jobs(jobs, tmp_path, budget_s=60, only=None)
    assert [s["status"] for s in status] == ["exit 0", "skipped (budget)"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"what": "x", "v": 1, "job": "echo"}]
