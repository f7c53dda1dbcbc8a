"""Writes lmflax/configs/finetune/data/pystdlib_instruct.jsonl: instruction/response pairs made
from the docstrings of the Python standard library (the embedded corpus's source), for the
`:tiny` variant of configs/finetune/llama_instruct.py. Run once; the file is committed so that
its content does not change with the Python version that runs lmflax.

  python tools/make_instruct_data.py
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

MODULES = [
    "base64",
    "bisect",
    "calendar",
    "collections",
    "colorsys",
    "copy",
    "csv",
    "datetime",
    "difflib",
    "fnmatch",
    "fractions",
    "functools",
    "glob",
    "hashlib",
    "heapq",
    "html",
    "itertools",
    "json",
    "math",
    "operator",
    "os.path",
    "pathlib",
    "pprint",
    "random",
    "re",
    "secrets",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "textwrap",
    "time",
    "urllib.parse",
    "uuid",
    "zlib",
]
OUT = (
    Path(__file__).resolve().parent.parent / "lmflax/configs/finetune/data/pystdlib_instruct.jsonl"
)


def first_paragraph(doc: str, limit: int = 400) -> str:
    para = inspect.cleandoc(doc).split("\n\n")[0]
    text = " ".join(line.strip() for line in para.splitlines())
    return text if len(text) <= limit else text[: limit - 3].rsplit(" ", 1)[0] + "..."


def pairs() -> list[dict[str, str]]:
    rows = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 20:
                continue
            kind = "class" if inspect.isclass(obj) else "function"
            response = first_paragraph(doc)
            if response.startswith(name + "("):  # a signature line, not a description
                continue
            rows.append(
                {
                    "prompt": f"What does the {kind} `{module_name}.{name}` do?",
                    "response": response,
                }
            )
    return rows


def main() -> None:
    rows = pairs()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} pairs -> {OUT}")


if __name__ == "__main__":
    main()
