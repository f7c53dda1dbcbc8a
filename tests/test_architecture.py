"""The library's shape: every module imports only from its own layer or the layers below, and
imports inside functions are kept for heavy optional dependencies (each with a reason)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lmflax"

# Bottom to top. A module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, ...]] = [
    ("lmflax.config", "lmflax.storage"),
    ("lmflax.nn", "lmflax.parallel"),
    ("lmflax.models", "lmflax.decode", "lmflax.evaluate", "lmflax.vectors", "lmflax.viz"),
    ("lmflax.data",),
    ("lmflax.hf",),
    ("lmflax.core",),
    ("lmflax.tasks",),
    ("lmflax.train",),
    ("lmflax.cli", "lmflax.__main__", "lmflax.configs"),
    ("lmflax",),
]

# Third-party modules that may be imported inside a function: optional or heavy, needed only on
# one path (a reason is given next to each such import).
DEFERRABLE = {
    "importlib",  # lmflax/__init__: the top-level names load lmflax.hf on first use
    "jax_plugins",
    "jax.experimental.pallas",  # the TPU kernels load Mosaic
    "scipy",
    "sacrebleu",
    "rouge_score",
    "pydoc_data",
    "libtpu",
    "datasets",
    "huggingface_hub",
    "torch",
    "transformers",
    "tensorboardX",
    "tensorflow",
    "wandb",
    "clu",
    "tqdm",
    "matplotlib",
    "gcsfs",
    "fsspec",
    "peft",
    "pyarrow",
    "sentencepiece",  # Marian's .spm tokenizers only (lmflax.data.marian_tokenizer)
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best


def _imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{a.name}" for a in child.names]
                # `from lmflax import hf` imports the module lmflax.hf.
                found.extend((n, child.lineno, in_function) for n in names)
            visit(child, inner)

    visit(tree, False)
    return found


def _resolve_target(name: str) -> str:
    """The lmflax module an import names (`lmflax.nn.Embed` -> `lmflax.nn`)."""
    parts = name.split(".")
    while parts:
        candidate = ROOT.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return name


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in SOURCES:
        _layer(_module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    module = _module_name(path)
    here = _layer(module)
    tree = ast.parse(path.read_text(), str(path))
    upward = []
    for name, line, _ in _imports(tree):
        if not name.startswith("lmflax"):
            continue
        target = _resolve_target(name)
        if module == "lmflax" and target != "lmflax":
            # The package root exposes names lazily (through importlib), never by import.
            upward.append(f"line {line}: the package root imports {target}")
        elif target != "lmflax" and _layer(target) > here:
            upward.append(
                f"line {line}: {module} (layer {here}) imports {target} (layer {_layer(target)})"
            )
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_inside_functions_only_defer_heavy_optional_dependencies(path):
    tree = ast.parse(path.read_text(), str(path))
    lines = path.read_text().splitlines()
    bad = []
    for name, line, in_function in _imports(tree):
        if not in_function:
            continue
        root_ok = any(name == d or name.startswith(d + ".") for d in DEFERRABLE)
        if name.startswith("lmflax") or not root_ok:
            bad.append(f"line {line}: {name} imported inside a function")
            continue
        # The reason sits on the import line or just above it (or above the imports it heads).
        context = " ".join(lines[max(0, line - 5) : line])
        if "#" not in context:
            bad.append(f"line {line}: deferred import of {name} without a one-line reason")
    assert not bad, "\n".join(bad)


def test_the_layer_test_catches_an_upward_import(tmp_path):
    """The check itself can fail: an nn module importing the trainer is reported."""
    tree = ast.parse("from lmflax.train import Trainer\n")
    names = [_resolve_target(n) for n, _, _ in _imports(tree)]
    assert names == ["lmflax.train"] and _layer("lmflax.train") > _layer("lmflax.nn.attention")
    inner = ast.parse("def f():\n    from lmflax import hf\n")
    assert _imports(inner) == [("lmflax.hf", 2, True)]
