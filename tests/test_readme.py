"""The README's and the docs' Python examples run as written."""

from __future__ import annotations

import os
import re

import pytest

from .conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page.relative_to(ROOT).as_posix(), i, block)
    for page in PAGES
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


@pytest.mark.parametrize(
    ("page", "index", "block"), BLOCKS, ids=[f"{p}[{i}]" for p, i, _ in BLOCKS]
)
def test_python_block_runs(page, index, block, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    monkeypatch.chdir(ROOT)
    exec(compile(block, f"{page}[python block {index}]", "exec"), {"__name__": "readme"})
    assert os.environ["TFDS_DATA_DIR"] == data_dir


def test_docs_have_examples_and_the_readme_links_every_page():
    assert len(BLOCKS) >= 2
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
