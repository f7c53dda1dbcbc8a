"""Bad inputs are named, never a traceback or a silent acceptance (issue 17, defects 3 and 8-12):
non-finite config values and updates, a damaged metrics.jsonl, a garbage tokenizer.json,
invalid UTF-8 in training data, config-file errors and non-ASCII digits, and values that can be
refused before any work starts."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import textwrap
import typing
from pathlib import Path

import jax
import numpy as np
import pytest

from lmflax import cli
from lmflax import config as cfglib
from lmflax.config import ConfigError, load_config_file, override
from lmflax.data import pipeline, sources
from lmflax.data.sources import DataError
from lmflax.data.tokenizers import Tokenizer, train_tokenizer
from lmflax.train import checks, resolve
from lmflax.train.metrics import MetricsFileError, MetricWriter, read_metrics

from .conftest import run_train

SHIPPED = ("gpt_tiny", "bert_tiny", "wmt14_de_en", "word2vec", "sst2")


def _float_fields(obj: object, prefix: str) -> list[str]:
    """Dotted keys of every float-typed field of the config tree under `obj`."""
    keys = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _float_fields(value, f"{prefix}{f.name}.")
        elif float in (hints[f.name], *typing.get_args(hints[f.name])):
            keys.append(f"{prefix}{f.name}")
    return keys


# ---------------------------------------------------------------------------------------------
# 3. non-finite values


@pytest.mark.parametrize("name", SHIPPED)
def test_every_float_field_refuses_nan_and_inf(name):
    cfg, _ = load_config_file(name)
    keys = _float_fields(cfg, "")
    # The model section is checked as well as the others (init_std, norm_eps, sample, ...).
    assert any(k.startswith("model.") for k in keys) and "optimizer.learning_rate" in keys
    for key in keys:
        for text in ("nan", "inf", "-inf"):
            bad = cfglib.apply_overrides(cfg, [f"{key}={text}"])
            with pytest.raises(ConfigError, match=re.escape(key) + " must be a finite"):
                resolve(bad)


def test_a_nonfinite_value_on_the_command_line_exits_2(capsys, tmp_path):
    code = cli.main(["train", f"--workdir={tmp_path / 'w'}", "--config.model.init_std=nan", "-q"])
    assert code == 2
    assert "model.init_std must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def _tiny_trainer(**updates):
    from lmflax.train import Trainer

    cfg, _ = load_config_file(None)
    cfg = override(
        cfg,
        {
            "model.vocab_size": 64,
            "model.num_layers": 1,
            "model.d_model": 32,
            "model.d_ff": 64,
            "data.batch_size": 4,
            "data.seq_len": 8,
            "mesh.data": 1,
            "train.nonfinite": "skip",
            **updates,
        },
    )
    return Trainer.create(cfg)


def _batch() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, 64, (4, 9)).astype(np.int32)
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)),
        "segment_ids": np.ones((4, 8), np.int32),
        "weights": np.ones((4, 8), np.float32),
    }


def test_an_update_that_overflows_the_parameters_is_skipped():
    """Finite loss and gradients, but learning_rate=1e39 makes every updated parameter inf:
    the step counts as skipped and the state stays bit-identical (and finite)."""
    tr = _tiny_trainer(
        **{
            "optimizer.learning_rate": 1e39,
            "optimizer.warmup_steps": 0,
            "optimizer.clip_norm": 0.0,
            "optimizer.schedule": "constant",
        }
    )
    step = tr.jit_train_step()
    with tr.context():
        before = jax.device_get(tr.state.arrays())
        s1, m1 = step(tr.state, tr.global_batch(_batch()), jax.random.key(0))
        after = jax.device_get(s1.arrays())
    assert np.isfinite(float(m1["grad_norm"][0])) and np.isfinite(float(m1["loss"][0]))
    assert float(m1["skipped"]) == 1.0
    assert int(after["step"]) == int(before["step"]) + 1
    for a, b in zip(
        jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
        jax.tree.leaves(after["params"]) + jax.tree.leaves(after["opt_state"]),
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_a_finite_update_is_still_applied():
    tr = _tiny_trainer(**{"optimizer.warmup_steps": 0})
    step = tr.jit_train_step()
    with tr.context():
        before = jax.device_get(tr.state.params)
        s1, m1 = step(tr.state, tr.global_batch(_batch()), jax.random.key(0))
        after = jax.device_get(s1.params)
    assert float(m1["skipped"]) == 0.0
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
    )


def test_a_run_that_ends_with_a_nonfinite_loss_does_not_exit_0(monkeypatch, capsys, tmp_path):
    from lmflax.cli import train as train_cmd

    def fake_run(cfg, workdir, *, config_name):
        return {"final_step": 5, "final_loss": float("nan"), "skipped_total": 5}

    monkeypatch.setattr(train_cmd, "run", fake_run)
    code = cli.main(["train", f"--workdir={tmp_path}", "-q"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "final logged loss is nan" in err and "5 steps skipped" in err


@pytest.mark.slow
def test_a_run_of_overflowing_updates_skips_them_and_saves_finite_state(data_dir, tmp_path):
    """learning_rate=1e39 under nonfinite=skip: every step is counted as skipped and said so,
    and the checkpoint holds the (finite) initial parameters, not inf."""
    proc = run_train(
        [
            f"--workdir={tmp_path}",
            "--config.model.num_layers=1",
            "--config.model.d_model=32",
            "--config.model.d_ff=64",
            "--config.data.seq_len=32",
            "--config.data.batch_size=4",
            "--config.data.eval_split=",
            "--config.train.sample_tokens=0",
            "--config.train.steps=3",
            "--config.train.log_every=1",
            "--config.optimizer.learning_rate=1e39",
            "--config.optimizer.warmup_steps=0",
            "--config.optimizer.clip_norm=0",
            "--config.train.nonfinite=skip",
        ],
        data_dir,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 steps skipped (non-finite)" in proc.stdout
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_total"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    import orbax.checkpoint as ocp

    params = ocp.PyTreeCheckpointer().restore(tmp_path / "checkpoints" / "3" / "state")["params"]
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# 8. metrics.jsonl damaged by a crash


def _write_lines(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_a_partial_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    whole = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]
    _write_lines(path, whole, tail='{"step": 3, "lo')  # killed while appending step 3
    with caplog.at_level(logging.WARNING, logger="lmflax"):
        assert read_metrics(path) == whole
    assert "line 3" in caplog.text and "partial" in caplog.text
    # Resuming from step 2 rewrites the file without the piece, so the next record is whole.
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.truncate_after(2)
    writer.write(3, {"loss": 2.0})
    assert read_metrics(path) == [*whole, {"step": 3, "loss": 2.0}]
    assert path.read_text().endswith("\n")


def test_a_last_record_missing_only_its_newline_is_kept_and_completed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}')
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.truncate_after(2)
    writer.write(3, {"loss": 2.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_damage_before_the_last_line_is_named_with_its_line_number(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo\x00\x00\n{"step": 3, "loss": 2.0}\n')
    with pytest.raises(MetricsFileError, match=r"metrics\.jsonl line 2 is not a JSON record"):
        read_metrics(path)
    with pytest.raises(MetricsFileError, match="line 2"):
        MetricWriter(tmp_path, tensorboard=False).truncate_after(1)
    assert "\x00" in path.read_text()  # nothing was rewritten


@pytest.mark.slow
def test_a_run_resumes_past_a_metrics_line_cut_by_a_crash(data_dir, tmp_path):
    args = [
        f"--workdir={tmp_path}",
        "--config.model.num_layers=1",
        "--config.model.d_model=32",
        "--config.model.d_ff=64",
        "--config.data.seq_len=32",
        "--config.data.batch_size=4",
        "--config.data.eval_split=",
        "--config.train.sample_tokens=0",
        "--config.train.log_every=1",
    ]
    run_train([*args, "--config.train.steps=2"], data_dir)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 7.')  # the process died here
    proc = run_train([*args, "--config.train.steps=4"], data_dir)
    assert "partial record" in proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# 9. a garbage tokenizer.json


@pytest.mark.parametrize(
    "content", ["garbage{", '{"version": "1.0"}', "", '{"model": {"type": "BPE", "vocab": 3}}']
)
def test_a_garbage_tokenizer_file_is_a_data_error_naming_it(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"tokenizer file {path} is not a readable"):
        Tokenizer.from_file(path)
    cfg, _ = load_config_file(None)
    data = dataclasses.replace(cfg.data, tokenizer=str(path))
    with pytest.raises(DataError, match=str(path)):
        pipeline.tokenizer_for(data, 4096)


def test_a_garbage_tokenizer_file_is_exit_1_with_the_file_named(tmp_path, capsys):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"\x00\xff garbage")
    code = cli.main(
        ["train", f"--workdir={tmp_path / 'w'}", f"--config.data.tokenizer={path}", "-q"]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert str(path) in err.strip().splitlines()[-1] and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 10. invalid UTF-8 names the record's index in the dataset


def test_invalid_utf8_in_training_names_the_dataset_index(monkeypatch):
    records = [{"text": f"record number {i} ".encode() * 3} for i in range(100)]
    records[60] = {"text": b"bro\xffken"}
    monkeypatch.setattr(sources, "data_source", lambda *a, **k: records)
    cfg, _ = load_config_file(None)
    cfg = override(cfg, {"data.seq_len": 16, "data.batch_size": 2, "data.shuffle_buffer": 1})
    tok = train_tokenizer("bpe", iter(["record number text"] * 20), 300)
    # The shuffled stream reaches record 60 at another position (the old message named that).
    order = pipeline.documents(cfg.data, "train", seed=cfg.train.seed)
    position = next(i for i in range(100) if order[i] == records[60])
    assert position != 60
    it = iter(pipeline.causal_lm_dataset(cfg, tok, "train", seed=cfg.train.seed, batch_size=2))
    with pytest.raises(DataError, match=r"record 60, feature 'text' is not valid UTF-8"):
        for _ in range(200):
            next(it)


# ---------------------------------------------------------------------------------------------
# 11. config files and command-line numbers


def _config_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_a_syntax_error_in_a_config_file_names_file_and_line(tmp_path, capsys):
    path = _config_file(
        tmp_path,
        """
        from lmflax.config import Config

        def get_config(:
            return None
        """,
    )
    with pytest.raises(ConfigError, match=rf"{path}:4:.*SyntaxError"):
        load_config_file(str(path))
    assert cli.main(["config", "show", f"--config={path}"]) == 2
    assert f"{path}:4" in capsys.readouterr().err


def test_a_failing_config_file_names_the_line(tmp_path):
    path = _config_file(
        tmp_path,
        """
        from lmflax.config import Config

        def get_config():
            return Config(model=PRESTS["gpt_tiny"])
        """,
    )
    with pytest.raises(ConfigError, match=rf"{path}:5: NameError: name 'PRESTS'"):
        load_config_file(str(path))


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("train=TrainConfig(steps='10')", "", r"train\.steps must be an integer, got '10'"),
        ("optimizer=OptimizerConfig(learning_rate='big')", "", r"optimizer\.learning_rate must"),
        ("train=TrainConfig(progress=1)", "", r"train\.progress must be a bool"),
        ("data=DataConfig(seq_len=12.5)", "", r"data\.seq_len must be an integer"),
    ],
)
def test_a_wrongly_typed_value_in_a_config_file_names_file_and_key(
    tmp_path, capsys, field, value, expected
):
    del value
    path = _config_file(
        tmp_path,
        f"""
        from lmflax.config import Config, DataConfig, OptimizerConfig, TrainConfig
        from lmflax.models import PRESETS

        def get_config():
            return Config(model=PRESETS["gpt_tiny"], {field})
        """,
    )
    with pytest.raises(ConfigError, match=expected):
        load_config_file(str(path))
    assert cli.main(["train", f"--config={path}", f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


def test_a_wrongly_typed_value_built_in_python_is_named_not_a_type_error():
    cfg, _ = load_config_file(None)
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps="10"))
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer"):
        resolve(bad)
    bad = override(cfg, {"model.num_heads": 2.0})
    with pytest.raises(ConfigError, match=r"model\.num_heads must be an integer"):
        resolve(bad)


def test_numpy_numbers_and_lists_in_a_python_config_are_accepted_and_checked():
    cfg, _ = load_config_file(None)
    ok = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, steps=np.int64(5)),
        task=dataclasses.replace(cfg.task, metrics=["bleu"]),
    )
    ok.validate()
    bad = dataclasses.replace(
        cfg, optimizer=dataclasses.replace(cfg.optimizer, eps=np.float32("nan"))
    )
    with pytest.raises(ConfigError, match=r"optimizer\.eps must be a finite number"):
        bad.validate()


@pytest.mark.parametrize(
    "item",
    [
        "train.steps=３",
        "model.num_heads=٣",
        "train.steps=1_0",
        "optimizer.eps=1_0e-8",
        "optimizer.learning_rate=١e-3",
        "model.head_dim=٣",
    ],
)
def test_only_ascii_digits_are_numbers_on_the_command_line(item, capsys):
    cfg, _ = load_config_file(None)
    with pytest.raises(ConfigError, match="ASCII digits"):
        cfglib.apply_overrides(cfg, [item])
    assert cli.main(["config", "show", f"--config.{item}"]) == 2
    assert item.split("=")[0] in capsys.readouterr().err


def test_ordinary_numbers_still_parse():
    cfg, _ = load_config_file(None)
    cfg = cfglib.apply_overrides(
        cfg,
        [
            "train.steps= 12",
            "train.seed=-3",
            "optimizer.learning_rate=3E-4",
            "optimizer.eps=.5",
            "optimizer.clip_norm=2.",
            "mesh.memory_budget_gib=10",
        ],
    )
    assert (cfg.train.steps, cfg.train.seed) == (12, -3)
    assert cfg.optimizer.learning_rate == 3e-4 and cfg.optimizer.eps == 0.5
    assert cfg.optimizer.clip_norm == 2.0 and cfg.mesh.memory_budget_gib == 10.0
    assert math.isnan(cfglib.apply_overrides(cfg, ["optimizer.eps=NaN"]).optimizer.eps)


# ---------------------------------------------------------------------------------------------
# 12. values refused before work starts


@pytest.mark.parametrize(
    "updates,expected",
    [
        ({"model.vocab_size": 1}, r"model\.vocab_size must be >= 2"),
        ({"model.vocab_size": 0}, r"model\.vocab_size must be >= 2"),
        ({"task.doc_stride": 0}, r"task\.doc_stride must be > 0"),
        ({"task.num_labels": 0}, r"task\.num_labels must be > 0"),
        ({"data.tokenizer_train_docs": -1}, r"data\.tokenizer_train_docs must be >= 0"),
        ({"data.text_key": ""}, r"data\.text_key must not be empty"),
        ({"generate.repetition_penalty": 0.0}, r"generate\.repetition_penalty must be > 0"),
        (
            {"generate.encoder_repetition_penalty": -1.0},
            r"generate\.encoder_repetition_penalty must be > 0 \(1\.0 = off\), got -1\.0",
        ),
    ],
)
def test_impossible_values_are_refused_at_validation(updates, expected):
    cfg, _ = load_config_file(None)
    with pytest.raises(ConfigError, match=expected):
        resolve(override(cfg, updates))


def test_word2vec_vocab_of_one_is_refused():
    cfg, _ = load_config_file("word2vec")
    with pytest.raises(ConfigError, match=r"model\.vocab_size must be >= 2"):
        resolve(override(cfg, {"model.vocab_size": 1}))


@pytest.mark.parametrize("kind,size,least", [("bpe", 257, 258), ("wordpiece", 5, 6)])
def test_a_vocab_smaller_than_any_trained_tokenizer_is_refused_before_training(kind, size, least):
    cfg, _ = load_config_file(None)
    cfg = override(cfg, {"model.vocab_size": size, "data.tokenizer": kind})
    with pytest.raises(ConfigError, match=rf"at least {least} tokens"):
        checks.check_run(resolve(cfg))
    # The floor is real: a tokenizer trained with that vocab_size is bigger than the table.
    assert train_tokenizer(kind, iter(["a b"] * 4), size).vocab_size >= least
    checks.check_run(resolve(override(cfg, {"model.vocab_size": least})))


def test_a_tokenizer_that_is_neither_a_kind_nor_a_file_is_refused_before_training(tmp_path):
    cfg, _ = load_config_file(None)
    with pytest.raises(ConfigError, match=r"data\.tokenizer='bpee'.*did you mean 'bpe'"):
        checks.check_run(resolve(override(cfg, {"data.tokenizer": "bpee"})))
    path = tmp_path / "tok.json"
    train_tokenizer("bpe", iter(["a b"] * 4), 300).save(path)
    checks.check_run(resolve(override(cfg, {"data.tokenizer": str(path)})))


def test_vocab_too_small_for_the_tokenizer_is_exit_2_before_the_workdir(tmp_path, capsys):
    code = cli.main(["train", f"--workdir={tmp_path / 'w'}", "--config.model.vocab_size=100"])
    assert code == 2
    assert "model.vocab_size=100" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing written, nothing trained or cached
