"""The README's and the docs' Python examples run as written."""

from __future__ import annotations

import os
import re

import pytest

from lmflax.cli.common import default_workdir

from .conftest import ROOT, run_train

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


@pytest.mark.slow  # the README's own run: the full default config, ~4 min on 2 CPU cores
def test_the_readme_shows_the_numbers_a_default_run_prints(data_dir, tmp_path):
    """`python train.py` as the README runs it (default config, default XLA flags) ends with the
    summary line the README shows: the same steps and workdir, the losses to the printed digits
    (within 2e-3, for floating-point differences between CPUs)."""
    readme = (ROOT / "README.md").read_text()
    shown = re.search(
        r"^done: step (\d+), loss ([\d.]+), eval loss ([\d.]+); workdir (\S+)$", readme, re.M
    )
    assert shown, "README.md shows no 'done: step N, loss X, eval loss Y; workdir DIR' line"
    step, loss, eval_loss, workdir = shown.groups()
    assert workdir == default_workdir("gpt_tiny")
    # the user's compiler settings, not the test session's faster-compiling ones
    flags = " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split() if "backend_optimization" not in f
    )
    out = run_train(
        [f"--workdir={tmp_path / 'gpt_tiny'}"], data_dir, env={"XLA_FLAGS": flags}, timeout=3600
    )
    printed = re.search(
        r"^done: step (\d+), loss ([\d.]+), eval loss ([\d.]+); workdir", out.stdout, re.M
    )
    assert printed, out.stdout[-2000:]
    got = printed.groups()
    assert got[0] == step, f"README shows step {step}, the run ends at step {got[0]}"
    assert (
        abs(float(got[1]) - float(loss)) < 2e-3 and abs(float(got[2]) - float(eval_loss)) < 2e-3
    ), (
        f"README shows loss {loss}, eval loss {eval_loss}; a default run prints loss {got[1]}, "
        f"eval loss {got[2]}"
    )
