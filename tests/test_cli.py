"""The `lmflax` command: each subcommand answers --help, errors map to the documented exit codes,
the console script is declared, and a run checks its config once."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lmflax import cli
from lmflax.cli import common
from lmflax.config import ConfigError
from lmflax.data.hub import CheckpointError
from lmflax.data.sources import DataError
from lmflax.train import TrainingError, checks

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lmflax {command}"), out[:200]
    assert "--config.KEY=VALUE" in out or command in ("viz", "vectors")


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out


def test_unknown_subcommand_and_unknown_flag_exit_2(capsys):
    for argv in (["trian"], ["train", "--wrkdir=x"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2, argv
        assert "error:" in capsys.readouterr().err


def test_config_show_prints_the_resolved_config_with_overrides(capsys):
    code = cli.main(["config", "show", "--config=bert_tiny", "--config.train.steps=7"])
    assert code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["steps"] == 7
    assert shown["task"]["name"] == "mlm"


def test_a_bad_override_is_exit_2_with_the_key_named(capsys):
    code = cli.main(["config", "show", "--config.train.stpes=7"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.stpes" in err and "steps" in err  # the typo and the suggestion


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("x"), 2),
        (DataError("x"), 1),
        (CheckpointError("x"), 1),
        (TrainingError("x"), 1),
        (OSError("x"), 1),
        (ValueError("x"), 1),
    ],
)
def test_exit_code_table(error, code, capsys):
    def fail() -> int:
        raise error

    assert common.run_reporting_errors(fail) == code
    assert capsys.readouterr().err.startswith("error: x")


def test_an_unexpected_exception_is_not_hidden():
    def fail() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        common.run_reporting_errors(fail)


def test_console_script_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["lmflax"] == "lmflax.cli:main"


def test_python_m_lmflax_is_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "lmflax", "plan", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: lmflax plan")


def test_train_py_refuses_contradictory_modes(capsys):
    assert cli.train_py is not None
    with pytest.raises(SystemExit) as e:
        cli.train_py(["--eval_only", "--plan"])
    assert e.value.code == 2
    assert "choose one of" in capsys.readouterr().err


def test_a_config_is_resolved_once_per_run(tmp_path, monkeypatch, capsys):
    """`lmflax plan` goes CLI -> Trainer.create -> plan; the cross-layer check runs once."""
    calls = []
    real = checks._resolve

    def counting(cfg, need_weights=True):
        calls.append(cfg)
        return real(cfg, need_weights)

    monkeypatch.setattr(checks, "_resolve", counting)
    checks._resolve_cached.cache_clear()
    code = cli.main(
        [
            "plan",
            "--config=gpt_tiny",
            "--config.model.num_layers=1",
            "--config.model.d_model=32",
            "--config.model.d_ff=64",
            "--config.model.vocab_size=256",
            "--config.data.seq_len=16",
            "--config.data.batch_size=2",
            "--config.data.tokenizer=byte",
        ]
    )
    checks._resolve_cached.cache_clear()
    assert code == 0, capsys.readouterr().err
    assert len(calls) == 1


URLS_REFUSED = [
    ("s3://bucket/run", "mount"),  # orbax/tensorstore write only local paths and gs://
    ("gcs://bucket/run", "does not know"),  # a typo'd scheme
    ("file://otherhost/run", "local path"),
]
if importlib.util.find_spec("gcsfs") is None and importlib.util.find_spec("tensorflow") is None:
    URLS_REFUSED.append(("gs://bucket/run", "pip install gcsfs"))


@pytest.mark.parametrize("command", ["train", "eval", "generate", "config show"])
@pytest.mark.parametrize(("url", "why"), URLS_REFUSED)
def test_a_url_workdir_lmflax_cannot_write_is_refused_not_made_a_local_folder(
    command, url, why, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main([*command.split(), f"--workdir={url}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert url in err and why in err
    assert list(tmp_path.iterdir()) == []  # no folder named 's3:'
