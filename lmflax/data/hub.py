"""Hugging Face model folders as files: where a model's directory is, and reading its JSON.

Shared by the tokenizers (lmflax.data) and the checkpoint readers (lmflax.hf). `model_dir`
takes a local directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: a bad file, an unsupported architecture, a tensor of
    the wrong shape, a missing or unexpected tensor. The message names what was wrong."""


def model_dir(path: str | Path) -> Path:
    """The directory `path`, or FileNotFoundError saying it is missing or not a directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Hugging Face model directory {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory; from_pretrained takes a Hugging Face model directory "
            "(config.json + model.safetensors or pytorch_model.bin)"
        )
    return path


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; FileNotFoundError / CheckpointError name the file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: a Hugging Face model directory needs {what} ({path.name})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(path: str | Path) -> dict[str, Any]:
    """The directory's config.json as a dict."""
    return read_json(model_dir(path) / "config.json", "its model config")
