"""train.writers: metrics.jsonl and TensorBoard as before, any other writer plugged in as
'python:MODULE:CALLABLE' (clu's MetricWriter interface); a progress ETA that leaves out the
first steps' compilation."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from lmflax import config as config_lib
from lmflax.config import ConfigError
from lmflax.train import metrics, resolve
from lmflax.train.metrics import MetricWriter, Progress

PLUGIN = '''
import json
from pathlib import Path


class FileWriter:
    """A writer of one's own: appends what it is given to <workdir>/plugin.jsonl."""

    def __init__(self, workdir):
        self.path = Path(workdir) / "plugin.jsonl"
        self.closed = False

    def write_scalars(self, step, scalars):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "scalars": dict(scalars)}) + "\\n")

    def write_texts(self, step, texts):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "texts": dict(texts)}) + "\\n")

    def flush(self):
        pass

    def close(self):
        with open(self.path, "a") as f:
            f.write(json.dumps({"closed": True}) + "\\n")


not_callable = 3
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_writers.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "python:my_writers:FileWriter"
    sys.modules.pop("my_writers", None)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_plugged_in_writer_gets_the_scalars_and_texts(tmp_path, plugin):
    w = MetricWriter(tmp_path, writers=f"jsonl,{plugin}")
    w.write(10, {"loss": 2.5, "skipped": 0, "note": "x", "bad": float("nan")})
    w.write(10, {"loss": 3.0}, file="eval_metrics", prefix="eval/")
    w.write_text(10, "sample", "def f():")
    w.close()
    got = _records(tmp_path / "plugin.jsonl")
    assert got[0] == {"step": 10, "scalars": {"loss": 2.5, "skipped": 0.0}}
    assert got[1] == {"step": 10, "scalars": {"eval/loss": 3.0}}
    assert got[2] == {"step": 10, "texts": {"sample": "def f():"}}
    assert got[3] == {"closed": True}
    assert metrics.read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 2.5
    assert not (tmp_path / "tensorboard").exists()


def test_without_jsonl_no_metrics_file_is_written(tmp_path, plugin):
    w = MetricWriter(tmp_path, writers=plugin)
    w.write(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "plugin.jsonl").exists()


def test_bad_writer_names_are_config_errors(plugin):
    base = config_lib.load_config_file("gpt_tiny")[0]
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        config_lib.apply_overrides(base, ["train.writers=jsonl,tensorbord"]).validate()
    for spec, why in [
        ("python:no_such_module_xyz:W", "No module named"),
        ("python:my_writers:Missing", "Missing"),
        ("python:my_writers:not_callable", "not callable"),
        ("python:my_writers", "MODULE:CALLABLE"),
    ]:
        cfg = config_lib.apply_overrides(base, [f"train.writers=jsonl,{spec}"])
        with pytest.raises(ConfigError, match=why):
            resolve(cfg)
    ok = config_lib.apply_overrides(base, [f"train.writers=jsonl,tensorboard,{plugin}"])
    assert resolve(ok) is ok


def test_eta_leaves_out_the_first_updates_compile_time(monkeypatch):
    clock = iter([100.0, 101.0, 102.0])  # first update after a 100 s compile, then 1 s a step
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = Progress(total=12, start=0, stream=out)
    p.update(1, 5.0, 1000.0)
    p.update(2, 4.0, 1000.0)
    p.update(3, 3.0, 1000.0)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("ETA ?")
    assert lines[1].endswith("ETA 0:10")  # 10 steps left at 1 s each
    assert lines[2].endswith("ETA 0:09")


def test_a_training_run_feeds_a_plugged_in_writer(data_dir, tmp_path, plugin, monkeypatch):
    from lmflax.config import load_config_file, override
    from lmflax.train import run

    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    cfg, _ = load_config_file("gpt_tiny")
    overrides = {
        "model.num_layers": 1,
        "model.d_model": 32,
        "model.d_ff": 64,
        "model.num_heads": 2,
        "data.data_dir": data_dir,
        "data.seq_len": 16,
        "data.batch_size": 2,
        "data.eval_split": "",
        "train.steps": 4,
        "train.log_every": 2,
        "train.checkpoint_every": 0,
        "train.sample_tokens": 4,
        "train.progress": False,
        "train.writers": f"jsonl,{plugin}",
    }
    workdir = tmp_path / "run"
    run(override(cfg, overrides), workdir)
    got = _records(workdir / "plugin.jsonl")
    steps = [r["step"] for r in got if "scalars" in r]
    assert steps == [2, 4]
    assert {"loss", "learning_rate", "tokens_per_sec"} <= set(got[0]["scalars"])
    assert any("texts" in r and "sample" in r["texts"] for r in got)
    assert got[-1] == {"closed": True}
    assert not (workdir / "tensorboard").exists()
