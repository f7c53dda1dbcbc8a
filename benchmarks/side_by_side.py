"""lmflax and its peers measured in one session on one accelerator, with the ratios.

  python -m benchmarks.side_by_side --peers_dir=.peers --out_dir=$OUT --budget_s=540

Runs, most important first, each in its own process with a time limit: the GPU kernel tests
(cuDNN against XLA), the peers' ceilings (matmul, HBM, attention), then for GPT-2 small
(32 × 1024), BERT-base MLM (128 × 128) and a 1.3B GPT (8 × 2048) the lmflax benchmark beside the
plain-Flax calibration script at the same batch, the attention kernels against XLA at seq >= 512,
lmflax variants (defaults, XLA attention, packed batches), compile time against depth, and
Hugging Face PyTorch and Flax at the same batches. A job whose estimate no longer fits the
budget is skipped and listed. Writes results.jsonl (every JSON line), log.txt (every job's
output) and summary.md (the comparison table and the targets) to --out_dir, and prints the
summary last. The peer scripts are the ones in ../shared/peers (copied to .peers by
benchmarks/prepare_device.sh, since only the repository travels to the device machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    name: str
    estimate_s: float
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def _peer_call(peers: Path, script: str, call: str) -> list[str]:
    """Runs `call` in a namespace holding a peer script's definitions (its module-level runs,
    if any, cut off at `stop`), so the peers' own measuring code runs at the batch we choose."""
    code = (
        "import sys\n"
        f"path = {str(peers / script)!r}\n"
        "src = open(path).read()\n"
        "for stop in ('\\nbert = BertConfig()', '\\nif __name__ =='):\n"
        "    if stop in src:\n"
        "        src = src[: src.index(stop)]\n"
        "ns = {'__name__': 'peer'}\n"
        "exec(compile(src, path, 'exec'), ns)\n"
        "globals().update(ns)\n"
        f"{call}\n"
    )
    return [PY, "-c", code]


def _lmflax(name: str, config: str, *extra: str, est: float = 55) -> Job:
    argv = [PY, "-m", "benchmarks.train_throughput", f"--config={config}", f"--name={name}"]
    return Job(name, est, [*argv, *extra])


def smoke_jobs(peers: Path) -> list[Job]:
    """The same pipeline at toy sizes on any backend (a check of this script, not a result)."""
    tiny = "benchmarks/bench_configs/tiny.py"
    fast = ["--steps=3", "--warmup=1", "--matmul_n=256"]
    return [
        _lmflax("lmflax_gpt2_124m", f"{tiny}:gpt", *fast),
        Job(
            "plain_flax_gpt2_124m_b32",
            40,
            _peer_call(
                peers,
                "plain_flax_gpt.py",
                "run('plain_flax_gpt2_124m_b32', 2048, 2, 64, 4, 4, 64, 'xla', steps=3)",
            ),
        ),
        _lmflax("lmflax_bert_base_mlm", f"{tiny}:bert", *fast),
        Job(
            "plain_flax_bert_base_mlm",
            40,
            _peer_call(
                peers, "plain_flax_bert.py", "run(4, 64, 'xla', steps=3, tiny=True, tt='onehot')"
            ),
        ),
        Job(
            "attention_kernels",
            30,
            [
                PY,
                "-m",
                "benchmarks.attention",
                "--seq=128",
                "--tokens=256",
                "--heads=2",
                "--head_dim=16",
                "--steps=2",
            ],
        ),
        Job(
            "compile_time",
            60,
            [
                PY,
                "-m",
                "benchmarks.compile_time",
                f"--config={tiny}:gpt",
                "--layers=2,4",
                "--scan=true",
            ],
        ),
    ]


def jobs(peers: Path, hf_site: str | None) -> list[Job]:
    cfg = "benchmarks/bench_configs"
    hf_torch_runs = (
        "b = BertConfig(); run('hf_torch_bert_base_mlm', BertForMaskedLM(b), 128, 128, "
        "b.vocab_size, 12, 768, False)\n"
        "g = GPT2Config(); run('hf_torch_gpt2_124m', GPT2LMHeadModel(g), 32, 1024, "
        "g.vocab_size, 12, 768, True)\n"
        "run('hf_torch_gpt2_124m_compiled', GPT2LMHeadModel(g), 32, 1024, g.vocab_size, 12, 768,"
        " True, compile_=True)"
    )
    hf_flax_runs = (
        "import jax.numpy as jnp\n"
        "b = BertConfig(); run('hf_flax_bert_base_mlm', FlaxBertForMaskedLM(b, dtype=jnp.bfloat16,"
        " seed=0), 128, 128, b.vocab_size, 12, 768, False)\n"
        "g = GPT2Config(); run('hf_flax_gpt2_124m', FlaxGPT2LMHeadModel(g, dtype=jnp.bfloat16, "
        "seed=0), 32, 1024, g.vocab_size, 12, 768, True)"
    )
    gpu = {"JAX_PLATFORMS": "cuda"}
    plain_gpt2 = "run('plain_flax_gpt2_124m_b32', 50304, 12, 768, 12, 32, 1024, 'cudnn')"
    plain_1p3b = (
        "run('plain_flax_gpt_1p3b_scan', 50304, 24, 2048, 16, 8, 2048, 'cudnn', scan=True, steps=6)"
    )
    out = [
        Job(
            "gpu_kernel_tests",
            60,
            [PY, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_kernels.py"],
            gpu,
        ),
        _lmflax("lmflax_gpt2_124m", f"{cfg}/gpt2_small.py:tuned"),
        Job("plain_flax_gpt2_124m_b32", 40, _peer_call(peers, "plain_flax_gpt.py", plain_gpt2)),
        _lmflax("lmflax_bert_base_mlm", f"{cfg}/bert_base.py:tuned"),
        Job(
            "plain_flax_bert_base_mlm",
            40,
            _peer_call(peers, "plain_flax_bert.py", "run(128, 128, 'cudnn', tt='onehot')"),
        ),
        _lmflax("lmflax_gpt_1p3b", f"{cfg}/gpt_1p3b.py:tuned", "--steps=10", est=60),
        Job("plain_flax_gpt_1p3b_scan", 45, _peer_call(peers, "plain_flax_gpt.py", plain_1p3b)),
        Job(
            "attention_kernels",
            45,
            [
                PY,
                "-m",
                "benchmarks.attention",
                "--seq=512,1024,2048",
                "--heads=12",
                "--head_dim=64",
            ],
        ),
        Job(
            "compile_time",
            60,
            [
                PY,
                "-m",
                "benchmarks.compile_time",
                f"--config={cfg}/gpt2_small.py:tuned",
                "--layers=2,24",
                "--scan=true",
            ],
        ),
        Job("ceilings", 30, [PY, str(peers / "ceilings_jax.py")]),
        _lmflax("lmflax_gpt2_124m_base", f"{cfg}/gpt2_small.py:base"),
        _lmflax("lmflax_bert_base_mlm_base", f"{cfg}/bert_base.py:base"),
        _lmflax(
            "lmflax_gpt2_124m_xla_attention",
            f"{cfg}/gpt2_small.py:tuned",
            "--config.model.attention_impl=xla",
        ),
        _lmflax("lmflax_gpt2_124m_packed", f"{cfg}/gpt2_small.py:tuned", "--packed"),
        Job("hf_torch", 120, _peer_call(peers, "hf_torch.py", hf_torch_runs)),
    ]
    if hf_site:
        out.append(
            Job(
                "hf_flax",
                150,
                _peer_call(peers, "hf_flax.py", hf_flax_runs),
                {"PYTHONPATH": hf_site},
            )
        )
    return out


def run_jobs(
    todo: list[Job], out_dir: Path, budget_s: float, only: set[str] | None
) -> list[dict[str, Any]]:
    results_path, log_path = out_dir / "results.jsonl", out_dir / "log.txt"
    start = time.perf_counter()
    status = []
    for job in todo:
        if only and job.name not in only:
            continue
        elapsed = time.perf_counter() - start
        left = budget_s - elapsed
        if job.estimate_s > left:
            status.append({"job": job.name, "status": "skipped (budget)", "seconds": 0.0})
            continue
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **job.env}
        if "PYTHONPATH" in job.env:
            env["PYTHONPATH"] = os.pathsep.join(
                [job.env["PYTHONPATH"], os.environ.get("PYTHONPATH", "")]
            )
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                job.argv,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=max(30.0, min(2.5 * job.estimate_s, left)),
            )
            text, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            code = "timeout"
        seconds = time.perf_counter() - t0
        with log_path.open("a") as f:
            f.write(f"\n===== {job.name} (exit {code}, {seconds:.0f} s)\n{text}")
        with results_path.open("a") as f:
            for line in text.splitlines():
                if line.startswith("{"):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    f.write(json.dumps({**record, "job": job.name}) + "\n")
        status.append({"job": job.name, "status": f"exit {code}", "seconds": seconds})
        print(f"[{time.perf_counter() - start:5.0f} s] {job.name}: exit {code} in {seconds:.0f} s")
    return status


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _find(records: list[dict[str, Any]], what: str, **match: Any) -> dict[str, Any] | None:
    for r in records:
        if (
            r.get("what") == what
            and "error" not in r
            and all(r.get(k) == v for k, v in match.items())
        ):
            return r
    return None


def summarize(records: list[dict[str, Any]], anchors: list[dict[str, Any]], status: list) -> str:
    """The comparison table (tokens/s, MFU, ratio lmflax / peer) and the issue's targets."""
    lines = []
    env = next((r for r in records if r.get("what") == "lmflax"), {})
    lines.append(
        f"# Side by side: {env.get('device_kind', '?')}, {env.get('date', '?')}, "
        f"jax {env.get('jax', '?')}, flax {env.get('flax', '?')}"
    )
    lines.append("")
    lines.append("| model | system | batch × seq | tokens/s | MFU (989) | lmflax ÷ system |")
    lines.append("|---|---|---|---|---|---|")

    def peer(what: str, batch: int, **match: Any) -> tuple[dict | None, str]:
        r = _find(records, what, batch=batch, **match)
        if r is not None:
            return r, ""
        r = _find(anchors, what, batch=batch, **match)
        return r, " (anchor 2026-11-28, not this run)" if r else ""

    models = [
        (
            "GPT-2 small",
            "lmflax_gpt2_124m",
            32,
            [
                (
                    "lmflax, defaults (bf16, no dropout)",
                    "lmflax",
                    {"name": "lmflax_gpt2_124m_base"},
                ),
                ("plain Flax (cuDNN)", "plain_flax_gpt2_124m_b32", {}),
                ("HF PyTorch + torch.compile", "hf_torch_gpt2_124m_compiled", {}),
                ("HF PyTorch eager", "hf_torch_gpt2_124m", {}),
                ("HF Flax", "hf_flax_gpt2_124m", {}),
            ],
        ),
        (
            "BERT-base MLM",
            "lmflax_bert_base_mlm",
            128,
            [
                (
                    "lmflax, defaults (bf16, no dropout)",
                    "lmflax",
                    {"name": "lmflax_bert_base_mlm_base"},
                ),
                (
                    "plain Flax (one-hot token types)",
                    "plain_flax_bert_base_mlm",
                    {"token_types": "onehot"},
                ),
                ("HF PyTorch eager", "hf_torch_bert_base_mlm", {}),
                ("HF Flax", "hf_flax_bert_base_mlm", {}),
            ],
        ),
        (
            "GPT 1.3B",
            "lmflax_gpt_1p3b",
            8,
            [("plain Flax, scanned", "plain_flax_gpt_1p3b_scan", {})],
        ),
    ]
    headline = {}
    for model, name, batch, peers in models:
        mine = _find(records, "lmflax", name=name)
        headline[model] = mine
        batch = mine["batch"] if mine else batch
        if mine is None:
            lines.append(f"| {model} | lmflax (tuned) | {batch} × ? | not measured | | |")
        else:
            lines.append(
                f"| {model} | lmflax (tuned) | {mine['batch']} × {mine['seq']} | "
                f"{mine['tokens_s']:,.0f} | {_pct(mine.get('mfu'))} | 1.00 |"
            )
        for label, what, match in peers:
            r, note = peer(what, batch, **match)
            if r is None:
                lines.append(f"| {model} | {label} | {batch} × ? | not measured | | |")
                continue
            tok = r["tokens_s"]
            mfu = r.get("mfu_989", r.get("mfu") if what == "lmflax" else None)
            ratio = f"{mine['tokens_s'] / tok:.2f}" if mine else ""
            lines.append(
                f"| {model} | {label}{note} | {r['batch']} × {r['seq']} | {tok:,.0f} | "
                f"{_pct(mfu)} | {ratio} |"
            )
    lines += ["", "## Targets", ""]
    gpt, bert, big = headline["GPT-2 small"], headline["BERT-base MLM"], headline["GPT 1.3B"]
    lines.append(_target("GPT-2 small ≥ 600,000 tokens/s", gpt and gpt["tokens_s"], 600_000))
    lines.append(_target("BERT-base MLM ≥ 620,000 tokens/s", bert and bert["tokens_s"], 620_000))
    lines.append(_target("1.3B GPT ≥ 50% MFU of 989 TFLOP/s", big and big.get("mfu"), 0.50))
    ratio = next((r for r in records if r.get("what") == "compile_time_ratio"), None)
    hi_lo = ratio["layers"] if ratio else [24, 2]
    lines.append(
        _target(
            f"{hi_lo[0]}-layer compile ≤ 1.5× the {hi_lo[1]}-layer (scan_layers)",
            ratio and 1.5 / ratio["ratio"],
            1.0,
            shown=ratio and f"{ratio['ratio']:.2f}×",
        )
    )
    attn = [
        r
        for r in records
        if r.get("what") == "attention" and r.get("impl") == "cudnn" and r.get("seq", 0) >= 512
    ]
    slowest = min((r.get("speedup_fwd_bwd_vs_xla", 0) for r in attn), default=None)
    lines.append(
        _target(
            "cuDNN attention never slower than XLA at seq ≥ 512 (fwd+bwd, slowest case)",
            slowest,
            1.0,
            shown=slowest and f"{slowest:.2f}× XLA's speed",
        )
    )
    xla_model = _find(records, "lmflax", name="lmflax_gpt2_124m_xla_attention")
    if gpt and xla_model:
        lines.append(
            f"- GPT-2 step with cuDNN attention vs XLA attention: "
            f"{gpt['tokens_s'] / xla_model['tokens_s']:.2f}× the tokens/s"
        )
    lines += ["", "## Jobs", ""]
    lines += [f"- {s['job']}: {s['status']} ({s['seconds']:.0f} s)" for s in status]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def _target(label: str, value: float | None, need: float, shown: str | None = None) -> str:
    if value is None:
        return f"- {label}: not measured"
    text = shown or (f"{value:.1%}" if need < 1 else f"{value:,.0f}")
    return f"- {label}: {text} — {'met' if value >= need else 'NOT met'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers_dir", default=".peers", help="the peer scripts")
    parser.add_argument("--out_dir", default=os.environ.get("OUT", "side_by_side_out"))
    parser.add_argument("--budget_s", type=float, default=540.0, help="stop starting jobs after")
    parser.add_argument("--hf_site", default=None, help="PYTHONPATH with transformers 4.x")
    parser.add_argument("--only", default=None, help="comma-separated job names to run")
    parser.add_argument("--list", action="store_true", help="list the jobs and exit")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: check the pipeline")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    peers = Path(args.peers_dir).resolve()
    todo = smoke_jobs(peers) if args.smoke else jobs(peers, args.hf_site)
    if args.list:
        for job in todo:
            print(f"{job.name:36s} ~{job.estimate_s:4.0f} s")
        return 0
    if not (peers / "plain_flax_gpt.py").exists():
        parser.error(f"--peers_dir {peers} holds no peer scripts (run prepare_device.sh)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    status = run_jobs(todo, out_dir, args.budget_s, only)
    anchors = []
    for path in sorted(peers.glob("anchors-*.jsonl")):
        anchors += _load(path)
    summary = summarize(_load(out_dir / "results.jsonl"), anchors, status)
    (out_dir / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
