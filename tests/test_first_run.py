"""A new user's first screens: `python train.py` on a fresh data dir prints only lmflax's lines,
a dataset that is not there is one short message (exit 2, nothing written), a mistyped workdir
is refused, and a plan for a GPU without jax's CUDA plugin says what to install."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmflax import cli
from lmflax.cli import quiet
from lmflax.config import load_config_file
from lmflax.train import plan
from lmflax.train.loop import run_name

ROOT = Path(__file__).resolve().parents[1]

# What lmflax's own log lines look like (lmflax.cli.common.setup_logging).
OWN_LINE = re.compile(r"^\d\d:\d\d:\d\d [IWE] ")
FOREIGN = re.compile(
    r"WARNING|ERROR|Traceback|cudart|absl|InitGoogle|^[IWEF]\d{4} |^\d\d:\d\d:\d\d [WE] "
)


@pytest.mark.slow  # ~20-30 s: builds the corpus and a tokenizer, compiles a tiny model
def test_a_default_run_on_a_fresh_data_dir_prints_only_lmflax_lines(tmp_path):
    """No C++ start-up lines (no CUDA driver, no TPU), no TFDS warnings or 'Downloading and
    preparing' while the embedded corpus is built: what a new user sees first is lmflax's."""
    env = {
        k: v
        for k, v in os.environ.items()
        # as a user's shell: none of the test session's log settings, and not pinned to CPU
        if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "LMFLAX_NATIVE_LOGS")
    }
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")
    args = {
        "train.steps": 2,
        "train.eval_steps": 1,
        "model.num_layers": 1,
        "model.d_model": 32,
        "model.d_ff": 64,
        "data.batch_size": 4,
        "data.seq_len": 32,
        "model.vocab_size": 300,
        "data.tokenizer_train_docs": 300,
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--workdir={tmp_path / 'run'}"]
        + [f"--config.{k}={v}" for k, v in args.items()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]+", proc.stderr) if line.strip()]
    foreign = [line for line in lines if FOREIGN.search(line)]
    assert not foreign, "\n".join(foreign)
    assert lines and OWN_LINE.match(lines[0]) and "embedded corpus" in lines[0], lines[:3]
    assert "Downloading and preparing" not in proc.stdout and "Subsequent calls" not in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("done: step 2")


def test_the_noise_filter_drops_exactly_the_known_lines():
    noise = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1796278484.301625    9231 cudart_stub.cc:31] Could not find cuda drivers "
        "on your machine, GPU will not be used.\n"
        "Failed to find host bounds for accelerator type: WARNING: could not determine TPU "
        "accelerator type, please set env var `TPU_ACCELERATOR_TYPE` manually\n"
        "WARNING: Logging before InitGoogle() is written to STDERR\n"
        "E0000 00:00:1796278485.766062    9231 common_lib.cc:554] INVALID_ARGUMENT: Error: "
        "unexpected worker hostname 'WARNING: could not determine TPU worker hostnames or IP "
        "addresses' from env var TPU_WORKER_HOSTNAMES.\n"
        "=== Source Location Trace: ===\n"
        "learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327\n"
    )
    kept = "E0000 00:00:1.0 1 foo.cc:1] a real error\nlearning/x.cc:3\n"
    assert quiet.filter_noise(noise) == ""
    assert quiet.filter_noise(noise + kept) == kept  # a trace line outside a trace stays


def test_native_writes_to_stderr_are_filtered_and_the_rest_passes(capfd):
    with quiet.native_stderr_filtered():
        os.write(2, b"WARNING: Logging before InitGoogle() is written to STDERR\n")
        os.write(2, b"something else\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "something else\nafter\n"


def _train(argv, capsys):
    rc = cli.train_py(argv)
    return rc, capsys.readouterr()


@pytest.mark.parametrize("tiny", [["--config.train.steps=1"]])
def test_an_unknown_dataset_is_one_short_message_before_the_workdir(tiny, tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = [f"--workdir={workdir}", "--config.data.dataset=wikitext103", *tiny]
    rc, out = _train([*argv, f"--config.data.data_dir={tmp_path / 'tfds'}"], capsys)
    assert rc == 2
    err = out.err.strip()
    assert len(err.splitlines()) <= 3 and len(err) < 600, err
    assert "'wikitext103' is not a dataset TFDS knows" in err and "lmflax_pystdlib" in err
    assert "tfds build" not in err
    assert not workdir.exists()  # nothing written: no config.json


def test_an_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path, capsys):
    workdir = tmp_path / "run"
    data_dir = tmp_path / "tfds"
    argv = [
        f"--workdir={workdir}",
        "--config.data.dataset=lm1b",
        f"--config.data.data_dir={data_dir}",
    ]
    rc, out = _train(argv, capsys)
    assert rc == 2
    assert "'lm1b' is not prepared under" in out.err and "already prepared" not in out.err
    assert f"lmflax data prepare lm1b --data_dir={data_dir}" in out.err
    assert not workdir.exists()


def test_a_split_that_is_not_there_is_named_with_the_splits_that_are(data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = [f"--workdir={workdir}", "--config.data.eval_split=valdation"]
    rc, out = _train([*argv, f"--config.data.data_dir={data_dir}"], capsys)
    assert rc == 2 and "no split 'valdation'" in out.err and "'validation'" in out.err
    assert not workdir.exists()


@pytest.mark.parametrize("how", ["train.py", "lmflax eval"])
def test_evaluating_a_mistyped_workdir_is_refused(how, data_dir, tmp_path, capsys, monkeypatch):
    """Exit 2 and nothing evaluated (not the metrics of random parameters) unless --fresh."""
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    typo = tmp_path / "runs" / "gpt_tny"
    if how == "train.py":
        rc = cli.train_py(["--eval_only", f"--workdir={typo}"])
    else:
        rc = cli.main(["eval", f"--workdir={typo}"])
    out = capsys.readouterr()
    assert rc == 2 and str(typo) in out.err and "--fresh" in out.err
    assert '"eval"' not in out.out and not typo.exists()


def test_a_gpu_plan_without_jax_plugins_says_what_to_install(monkeypatch, capsys):
    """With no jax_plugins package at all, importlib's find_spec of 'jax_plugins.xla_cuda12'
    raises ModuleNotFoundError: the plan must still give its message, exit 2."""
    for name in [m for m in sys.modules if m == "jax_plugins" or m.startswith("jax_plugins.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "jax_plugins", None)  # import jax_plugins -> not found
    assert not plan.cuda_plugin_installed()
    rc = cli.main(["plan", "--topology=h200", "--config.model.num_layers=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs jax's CUDA plugin: pip install jax-cuda12-plugin" in err, err


def test_compiling_a_plan_reports_what_it_does_and_how_long(caplog):
    with caplog.at_level(logging.INFO, logger="lmflax"), plan.heartbeat("compiling X", every=0.05):
        time.sleep(0.18)
    lines = [r.getMessage() for r in caplog.records if r.name == "lmflax"]
    assert lines[0] == "compiling X ..." and re.fullmatch(
        r"compiling X: done in \d+\.\d s", lines[-1]
    )
    assert 2 <= sum(line.startswith("still compiling X (") for line in lines) <= 4


def test_a_run_from_a_hf_checkpoint_is_named_after_it(tmp_path):
    """`--config=bert_tiny --config.model=hf:DIR`: the logs name the checkpoint, not bert_tiny."""
    cfg, name = load_config_file("bert_tiny")
    assert run_name(cfg, name) == "bert_tiny"
    hf_dir = tmp_path / "all-MiniLM-L6-v2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    from_hf = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, init_from=f"hf:{hf_dir}")
    )
    assert run_name(from_hf, name) == "all-MiniLM-L6-v2 (BertModel, via config bert_tiny)"


@pytest.mark.slow
def test_a_tpu_plan_prints_no_libtpu_start_up_lines(tmp_path):
    """Describing a TPU topology makes libtpu write 'could not determine TPU accelerator type'
    and 'unexpected worker hostname' lines (after the start-up filter); the plan keeps them off
    the screen and prints its report."""
    pytest.importorskip("libtpu", reason="the test extra installs libtpu")
    proc = subprocess.run(
        [sys.executable, "-m", "lmflax", "plan", "--config=gpt_tiny", "--config.mesh.data=4",
         "--topology=v5e:2x2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plan for gpt_tiny" in proc.stdout and "fits the v5e chip" in proc.stdout
    for noise in ("could not determine TPU", "unexpected worker hostname", "Source Location"):
        assert noise not in proc.stderr, proc.stderr
