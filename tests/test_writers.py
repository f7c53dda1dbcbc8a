"""train.writers: metrics.jsonl and TensorBoard as before, any other writer plugged in as
'python:MODULE:CALLABLE' (clu's MetricWriter interface); a progress ETA that leaves out the
first steps' compilation."""

from __future__ import annotations

import io
import json
import struct
import sys
import time
import types
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


def _wandb_records(run_file: Path) -> list:
    """The records of a W&B offline run file: W&B's LevelDB-style log (a 7-byte file header,
    32 KiB blocks, each record a 7-byte header of crc, length, kind: 1 whole, 2-4 first/middle/
    last piece) of `wandb_internal_pb2.Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = run_file.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pieces, records = b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):
            pos += left  # the block's zero padding
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def _wandb_records_when_finished(run_file: Path, timeout: float = 60) -> list:
    """The records, once W&B's service has written the run's last ('exit') record: finish()
    returns before its background process has flushed the file."""
    deadline = time.time() + timeout
    while True:
        records = _wandb_records(run_file)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.time() < deadline, f"{run_file} has no exit record after {timeout} s"
        time.sleep(0.1)


def _wandb_history(run_file: Path) -> list[dict]:
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in _wandb_records_when_finished(run_file)
        if r.WhichOneof("record_type") == "history"
    ]


def test_wandb_gets_the_scalars_and_texts_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "lmflax-test")
    cfg, _ = config_lib.load_config_file("gpt_tiny")
    (tmp_path / "config.json").write_text(config_lib.to_json(cfg))
    w = MetricWriter(tmp_path, writers="jsonl,wandb")
    w.write(1, {"loss": 2.5, "skipped": 0, "bad": float("nan")})
    w.write(2, {"loss": 2.0})
    w.write_text(2, "sample", "def <f>")
    w.close()
    run_id = (tmp_path / "wandb_run_id").read_text()
    (first,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert first.name == f"run-{run_id}.wandb"
    records = _wandb_records_when_finished(first)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = records[kinds.index("run")].run
    assert (run.run_id, run.project, run.display_name) == (run_id, "lmflax-test", tmp_path.name)
    config_keys = {i.key for i in run.config.update}
    assert {"model", "train", "data"} <= config_keys  # the workdir's config.json
    history = _wandb_history(first)
    assert [(h["_step"], h["loss"]) for h in history] == [(1, 2.5), (2, 2.0)]
    assert history[0]["skipped"] == 0 and "bad" not in history[0]  # non-finite: jsonl only
    assert history[1]["sample/_type"] == "html-file"
    (page,) = first.parent.glob("files/media/html/sample_*.html")
    assert "def &lt;f&gt;" in page.read_text()
    # A resumed run: the same W&B run id, the steps after the checkpoint logged there.
    w = MetricWriter(tmp_path, writers="jsonl,wandb")
    w.write(3, {"loss": 1.5})
    w.close()
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    second = next(f for f in files if f != first)
    assert [(h["_step"], h["loss"]) for h in _wandb_history(second)] == [(3, 1.5)]


def _no_module(monkeypatch, name: str) -> None:
    real = metrics.importlib.import_module

    def fake(module, *args):
        if module == name or module.startswith(name + "."):
            raise ImportError(f"No module named {name!r}")
        return real(module, *args)

    monkeypatch.setattr(metrics.importlib, "import_module", fake)


@pytest.mark.parametrize(
    ("writer", "module", "package"),
    [("wandb", "wandb", "pip install wandb"), ("clu", "clu", "pip install clu tensorflow")],
)
def test_an_optional_writer_that_is_not_installed_is_a_config_error_naming_it(
    writer, module, package, monkeypatch, tmp_path
):
    _no_module(monkeypatch, module)
    base = config_lib.load_config_file("gpt_tiny")[0]
    cfg = config_lib.apply_overrides(base, [f"train.writers=jsonl,{writer}"])
    with pytest.raises(ConfigError, match=package):
        resolve(cfg)
    with pytest.raises(ConfigError, match=package):
        MetricWriter(tmp_path, writers=f"jsonl,{writer}")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_clu_writer_adapts_clus_default_writer(tmp_path, monkeypatch):
    """clu.metric_writers imports TensorFlow, which is not installed here: a stand-in module
    records what the adapter passes to `create_default_writer` and its writer (the real clu is
    not exercised)."""
    calls = []

    class Recorder:
        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a, k))

    fake = types.ModuleType("clu.metric_writers")
    fake.create_default_writer = lambda logdir, **k: (
        calls.append(("create", logdir, k)) or (Recorder())
    )
    monkeypatch.setitem(sys.modules, "clu", types.ModuleType("clu"))
    monkeypatch.setitem(sys.modules, "clu.metric_writers", fake)
    w = MetricWriter(tmp_path, writers="jsonl,clu")
    w.write(4, {"loss": 1.25, "bad": float("inf")})
    w.write_text(4, "sample", "x")
    w.close()
    assert calls[0] == ("create", str(tmp_path / "clu"), {"asynchronous": False})
    assert ("write_scalars", (4, {"loss": 1.25}), {}) in calls
    assert ("write_texts", (4, {"sample": "x"}), {}) in calls
    assert [c[0] for c in calls][-1] == "close"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_tqdm_draws_the_bar_and_its_eta_leaves_out_compile_time(monkeypatch):
    tqdm_std = pytest.importorskip("tqdm.std")
    now = [0.0]
    monkeypatch.setattr(tqdm_std, "time", lambda: now[0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    out = _Terminal()
    p = Progress(total=12, start=0, stream=out)  # made before the first step compiles
    for step, t in [(1, 100.0), (2, 101.0), (3, 102.0)]:  # 100 s compile, then 1 s a step
        now[0] = t
        p.update(step, 5.0 - step, 2000.0)
    last = out.getvalue().split("\r")[-1]
    assert "3/12" in last and "loss=2.0000" in last and "tok/s=2.0k" in last
    assert "<00:09" in last  # 9 steps left at 1 s each (not 102 s / 3 steps)
    p.close()
    assert out.getvalue().endswith("\n")


def test_off_a_terminal_the_plain_line_is_used_even_with_tqdm(monkeypatch):
    pytest.importorskip("tqdm")
    out = io.StringIO()
    p = Progress(total=4, start=0, stream=out)
    p.update(2, 1.5, 1000.0)
    p.close()
    assert out.getvalue().startswith("████████████") and "step 2/4" in out.getvalue()


TENSORBOARD_SCRIPT = """
import sys
from etils import epath
from lmflax.train.metrics import TensorBoardWriter

w = TensorBoardWriter(epath.Path(sys.argv[1]))
w.write_scalars(3, {"loss": 2.5, "eval/accuracy": 0.25})
w.write_texts(3, {"sample": "def f(x):"})
w.close()
print("torch" in sys.modules)
"""


def _events(path: Path) -> list:
    """The Event protos of a TensorBoard event file (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    raw, out, at = path.read_bytes(), [], 0
    while at < len(raw):
        (size,) = struct.unpack("<Q", raw[at : at + 8])
        event = event_pb2.Event()
        event.ParseFromString(raw[at + 12 : at + 12 + size])
        out.append(event)
        at += 12 + size + 4
    return out


def test_tensorboard_event_files_hold_the_values_and_the_writer_does_not_load_torch(tmp_path):
    """A fresh interpreter (torch is installed here) writes scalars and a text through the
    TensorBoard writer without importing torch (seconds per run), and the event file holds
    them at their step."""
    import subprocess

    pytest.importorskip("torch")
    out = subprocess.run(
        [sys.executable, "-c", TENSORBOARD_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    assert out.stdout.strip() == "False", out.stdout
    (path,) = tmp_path.glob("events.out.tfevents.*")
    values = {
        v.tag: (e.step, v) for e in _events(path) if e.HasField("summary") for v in e.summary.value
    }
    assert values["loss"][0] == 3 and values["loss"][1].simple_value == 2.5
    assert values["eval/accuracy"][1].simple_value == 0.25
    step, text = next((s, v) for tag, (s, v) in values.items() if tag.startswith("sample"))
    assert step == 3 and b"def f(x):" in text.tensor.string_val[0]
