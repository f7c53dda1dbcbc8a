"""The README's Python examples run as written."""

from __future__ import annotations

import os
import re

import pytest

from .conftest import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    monkeypatch.chdir(ROOT)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "readme"})
    assert os.environ["TFDS_DATA_DIR"] == data_dir


def test_readme_has_examples():
    assert len(BLOCKS) >= 2
