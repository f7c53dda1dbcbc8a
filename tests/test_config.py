"""Configs: overrides, strictness (unknown keys with suggestions), validation, JSON round trip, CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from lmflax import config as cfglib
from lmflax.models import PRESETS
from lmflax.parallel import validate_devices
from lmflax.train import resolve

from .conftest import ROOT


def _base() -> cfglib.Config:
    cfg, _ = cfglib.load_config_file(None)
    return cfg


def test_default_config_loads_and_validates():
    cfg, name = cfglib.load_config_file(None)
    assert name == "gpt_tiny"
    assert cfglib.validate(cfg) is cfg


def test_overrides_parse_by_field_type():
    cfg = cfglib.apply_overrides(
        _base(),
        [
            "train.steps=12",
            "optimizer.learning_rate=3e-4",
            "train.progress=false",
            "model.num_kv_heads=2",
            "model.head_dim=None",
            "data.tokenizer=wordpiece",
            "mesh.rules=(('batch', 'data'),)",
        ],
    )
    assert cfg.train.steps == 12 and cfg.optimizer.learning_rate == 3e-4
    assert (
        cfg.train.progress is False and cfg.model.num_kv_heads == 2 and cfg.model.head_dim is None
    )
    assert cfg.data.tokenizer == "wordpiece" and cfg.mesh.rules == (("batch", "data"),)


def test_model_preset_by_name():
    cfg = cfglib.apply_overrides(_base(), ["model=gpt2_small"])
    assert cfg.model == PRESETS["gpt2_small"]


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.stepz=3", "did you mean 'steps'"),
        ("model.num_layer=3", "did you mean 'num_layers'"),
        ("optimiser.learning_rate=1", "did you mean 'optimizer'"),
        ("data.batch_size.x=1", "not a section"),
        ("model=gpt3", "not a model preset"),
    ],
)
def test_unknown_keys_are_errors_with_suggestions(override, expected):
    with pytest.raises(cfglib.ConfigError, match=expected):
        cfglib.apply_overrides(_base(), [override])


def test_bad_values_name_the_field():
    with pytest.raises(cfglib.ConfigError, match=r"train\.steps takes an integer"):
        cfglib.apply_overrides(_base(), ["train.steps=many"])
    with pytest.raises(cfglib.ConfigError, match="bool"):
        cfglib.apply_overrides(_base(), ["train.progress=maybe"])


@pytest.mark.parametrize(
    "updates,expected",
    [
        ({"model.num_heads": 3}, "must divide model.d_model"),
        ({"model.num_kv_heads": 3}, "num_kv_heads"),
        ({"data.seq_len": 4096}, "longer than the model's learned positions"),
        ({"train.steps": 0}, "train.steps must be > 0"),
        ({"optimizer.learning_rate": -1.0}, "learning_rate must be > 0"),
        ({"optimizer.schedule": "cosin"}, "did you mean 'cosine'"),
        ({"model.activation": "gelu2"}, "model.activation"),
        ({"task.name": "mlmm"}, "did you mean 'mlm'"),
        ({"mesh.data": 0}, "mesh.data"),
        ({"mesh.data": -1, "mesh.fsdp": -1}, "at most one mesh axis"),
        ({"optimizer.grad_accum_steps": 3}, "divisible by optimizer.grad_accum_steps"),
    ],
)
def test_impossible_values(updates, expected):
    with pytest.raises(cfglib.ConfigError, match=expected):
        resolve(cfglib.override(_base(), updates))


def test_device_checks():
    cfg = cfglib.override(_base(), {"mesh.data": 2, "mesh.fsdp": 2})
    with pytest.raises(cfglib.ConfigError, match="= 4 but there are 8 devices"):
        validate_devices(cfg, 8)
    cfg = cfglib.override(_base(), {"data.batch_size": 12, "mesh.data": 8})
    with pytest.raises(
        cfglib.ConfigError,
        match=r"data.batch_size=12\) must be divisible by the data-parallel size data×fsdp = 8",
    ):
        validate_devices(cfg, 8)
    assert validate_devices(cfglib.override(_base(), {"mesh.tensor": 2}), 8) == {
        "data": 4,
        "fsdp": 1,
        "tensor": 2,
    }


def test_json_round_trip():
    for name in ("gpt_tiny", "bert_tiny", "gpt2_small", "bert_base"):
        cfg, _ = cfglib.load_config_file(name)
        assert cfglib.from_json(cfglib.to_json(cfg)) == cfg


def test_dict_configs_are_strict():
    with pytest.raises(cfglib.ConfigError, match="did you mean 'batch_size'"):
        cfglib.from_dict({"model": {"family": "gpt"}, "data": {"batch_sise": 3}})
    with pytest.raises(cfglib.ConfigError, match="family"):
        cfglib.from_dict({"model": {"family": "gtp"}})


def test_config_file_with_unknown_key(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        textwrap.dedent("""
        from lmflax.config import Config, TrainConfig
        from lmflax.models import PRESETS
        def get_config():
            return Config(model=PRESETS["gpt_tiny"], train=TrainConfig(step=5))
    """)
    )
    with pytest.raises(cfglib.ConfigError, match="did you mean 'steps'"):
        cfglib.load_config_file(str(path))


def test_config_file_with_arg(tmp_path):
    path = tmp_path / "witharg.py"
    path.write_text(
        textwrap.dedent("""
        import dataclasses
        from lmflax.config import Config, TrainConfig
        from lmflax.models import PRESETS
        def get_config(arg):
            return Config(model=PRESETS["gpt_tiny"], train=TrainConfig(steps=int(arg)))
    """)
    )
    cfg, name = cfglib.load_config_file(f"{path}:7")
    assert cfg.train.steps == 7 and name == "witharg"


def test_missing_config_file_lists_shipped_ones():
    with pytest.raises(cfglib.ConfigError, match=r"shipped configs: .*gpt_tiny"):
        cfglib.load_config_file("configs/gpt_tiyn.py")


def test_presets_differ_from_their_base_only_where_they_must():
    tiny, _ = cfglib.load_config_file("gpt_tiny")
    small, _ = cfglib.load_config_file("gpt2_small")
    assert small.task == tiny.task and small.mesh == tiny.mesh
    assert (
        dataclasses.replace(small.data, seq_len=tiny.data.seq_len, batch_size=tiny.data.batch_size)
        == tiny.data
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--config.train.stepz=3"], "did you mean 'steps'"),
        (["--config.model.num_heads=3"], "must divide model.d_model"),
        (["--config=configs/nope.py"], "does not exist"),
        (["--bogus"], "unrecognized argument"),
    ],
)
def test_cli_exits_2_on_bad_config(args, expected):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr


def test_loading_a_shipped_config_leaves_sys_path_alone():
    """Shipped configs live in lmflax/configs; their folder's parent (lmflax/) on sys.path would
    shadow top-level modules (`import train` would find lmflax/train)."""
    import sys

    before = list(sys.path)
    for name in ("gpt_tiny", "bert_base", "configs/sst2.py"):
        cfglib.load_config_file(name)
    assert sys.path == before
