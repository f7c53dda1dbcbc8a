"""Hugging Face model folders as files: where a model's directory is, and reading its JSON.

Shared by the tokenizers (lmflax.data) and the checkpoint readers (lmflax.hf). `model_dir`
takes a local directory or a hub id ('org/name'), which it finds in the Hugging Face cache
(downloading it first unless HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: a bad file, an unsupported architecture, a tensor of
    the wrong shape, a missing or unexpected tensor. The message names what was wrong."""


# A hub id: 'name' or 'org/name', optionally '@revision' (a branch, tag or commit).
_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<rev>[\w./-]+))?$"
)

# What lmflax reads from a model repository; weights are chosen separately (safetensors first).
_REPO_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "source.spm",  # Marian (Helsinki-NLP opus-mt): SentencePiece models per side
    "target.spm",
)
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors")
_TORCH_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin")


def is_hub_id(path: str | Path) -> bool:
    """Whether `path` reads as a Hugging Face hub id ('bert-base-uncased', 'org/name',
    'org/name@revision') rather than a local path. An existing local path is never an id."""
    text = str(path)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return False
    return _HUB_ID.match(text) is not None


def _local_dir(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"Hugging Face model directory {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory; from_pretrained takes a Hugging Face model directory "
            "(config.json + model.safetensors or pytorch_model.bin) or a hub id"
        )
    return path


def model_dir(
    path: str | Path, *, revision: str | None = None, subfolder: str | None = None
) -> Path:
    """The local directory of a model: `path` itself if it is a directory, or for a hub id
    ('org/name', 'org/name@revision') its snapshot in the Hugging Face cache (`HF_HUB_CACHE`,
    or `HF_HOME`/hub), downloaded first unless `HF_HUB_OFFLINE=1`. `revision` (branch, tag or
    commit) and `subfolder` as in transformers. FileNotFoundError says what is missing and
    how to fetch it."""
    if not is_hub_id(path):
        directory = _local_dir(Path(path).expanduser())
        return _local_dir(directory / subfolder) if subfolder else directory
    match = _HUB_ID.match(str(path))
    assert match is not None
    repo, at = match["repo"], match["rev"]
    if at is not None and revision is not None and at != revision:
        raise ValueError(f"{path} names revision {at!r} but revision={revision!r} was given")
    return hub_snapshot(repo, revision=revision or at, subfolder=subfolder)


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, read from the environment now (HF_HUB_CACHE, then
    HF_HOME/hub, then ~/.cache/huggingface/hub), so a changed variable is honoured."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value: never touch the network."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def download_command(repo: str, revision: str | None, subfolder: str | None) -> str:
    """The shell command that puts a repository's files lmflax reads into the cache."""
    parts = ["hf", "download", repo]
    if revision:
        parts += ["--revision", revision]
    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [prefix + "*.json", prefix + "*.safetensors", prefix + "*.txt"]
    parts += ["--include", *(f"'{p}'" for p in patterns)]
    return " ".join(parts)


def _miss(repo: str, revision: str | None, subfolder: str | None, why: str) -> FileNotFoundError:
    where = repo + (f" (revision {revision})" if revision else "")
    where += f", subfolder {subfolder}" if subfolder else ""
    return FileNotFoundError(
        f"{where} is not a local directory and its config.json is not in the Hugging Face cache "
        f"{hub_cache_dir()}; {why}. Fetch it on a machine with network access with\n  "
        f"{download_command(repo, revision, subfolder)}\n(set HF_HOME or HF_HUB_CACHE to where "
        "the files are), or pass the path of a local model directory"
    )


def hub_snapshot(repo: str, *, revision: str | None = None, subfolder: str | None = None) -> Path:
    """The cached snapshot directory of hub repository `repo` (downloading the files lmflax
    reads when it is not cached and the hub may be reached)."""
    try:
        import huggingface_hub  # deferred: only hub ids need it
    except ImportError:  # pragma: no cover - tokenizers depends on it
        raise FileNotFoundError(
            f"{repo} is not a local directory, and resolving hub ids needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    cache = hub_cache_dir()
    prefix = f"{subfolder}/" if subfolder else ""
    for marker in ("config.json", "tokenizer.json"):
        found = huggingface_hub.try_to_load_from_cache(
            repo, prefix + marker, cache_dir=cache, revision=revision
        )
        if isinstance(found, str):
            return Path(found).parent
    if hub_offline():
        raise _miss(repo, revision, subfolder, "HF_HUB_OFFLINE is set, so nothing is downloaded")
    try:
        names = huggingface_hub.list_repo_files(repo, revision=revision)
        weights = _SAFETENSORS if any(n.endswith(".safetensors") for n in names) else _TORCH_BIN
        root = huggingface_hub.snapshot_download(
            repo,
            revision=revision,
            cache_dir=cache,
            allow_patterns=[prefix + p for p in (*_REPO_FILES, *weights)],
        )
    except Exception as e:  # no network, unknown repository, gated model, ...
        raise _miss(
            repo, revision, subfolder, f"downloading it failed ({type(e).__name__}: {e})"
        ) from None
    return _local_dir(Path(root) / subfolder) if subfolder else _local_dir(Path(root))


def missing_files_hint(directory: Path) -> str:
    """For a directory inside the Hugging Face cache, the command that fetches what is missing
    (empty for other directories)."""
    parts = directory.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            repo = part.removeprefix("models--").replace("--", "/")
            sub = "/".join(parts[i + 3 :]) or None
            return f"; fetch the missing files with\n  {download_command(repo, parts[i + 2], sub)}"
    return ""


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; FileNotFoundError / CheckpointError name the file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: a Hugging Face model directory needs {what} ({path.name})"
            + missing_files_hint(path.parent)
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
