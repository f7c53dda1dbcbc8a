"""Fine-tuning configs that start from a pretrained Hugging Face checkpoint."""

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lmflax import hf
from lmflax.config import override
from lmflax.data.sources import build_once
from lmflax.hf import bart
from lmflax.models import GPT, PRESETS, EncoderDecoder


def model_and_tokenizer(arg: str | None, tiny: str, full: str, **changes: Any) -> tuple[Any, str]:
    """(model, data.tokenizer) for a config's argument: a checkpoint directory gives both
    ('hf:DIR'); 'tiny' (or no argument) the preset `tiny` (or `full`) with `changes`, and
    lmflax's wordpiece trained on the data."""
    if arg and arg != "tiny":
        return f"hf:{arg}", f"hf:{arg}"
    model = PRESETS[tiny if arg == "tiny" else full]
    return (dataclasses.replace(model, **changes) if changes else model), "wordpiece"


def tiny_llama_checkpoint() -> Path:
    """A random llama_tiny saved as a Hugging Face LlamaForCausalLM directory (seed 0)."""
    model = PRESETS["llama_tiny"]
    digest = hashlib.sha256(repr(model).encode()).hexdigest()[:12]  # a new preset, a new dir

    def write(tmp: Path) -> None:
        ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
        params = GPT(model).init(jax.random.key(0), ids, deterministic=True)["params"]
        hf.save_pretrained(model, params, _fresh(tmp))

    # Written aside under a lock, then renamed: concurrent runs never see half a directory.
    return build_once(Path(tempfile.gettempdir()) / f"lmflax-llama-tiny-{digest}", write)


def _fresh(tmp: Path) -> Path:
    """`tmp` as an empty directory (a crashed build may have left one behind)."""
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def tiny_seq2seq_checkpoint(name: str, arch: str, hf_config: dict[str, Any]) -> Path:
    """A random encoder-decoder saved as a Hugging Face `arch` directory under the temp dir
    (seed 0), made from the transformers config.json `hf_config` (shapes, token ids and
    generation settings, which config.json keeps): the `:tiny` checkpoint of a seq2seq
    fine-tuning config, so that export -> init_from -> train -> generate runs offline."""
    kind = {"BartForConditionalGeneration": "bart", "MarianMTModel": "marian"}[arch]
    model = bart.to_config(bart.ARCHS[kind], hf_config, (), f"{name} (tiny)")
    digest = hashlib.sha256(repr((model, sorted(hf_config.items()))).encode()).hexdigest()[:12]

    def write(tmp: Path) -> None:
        ids = jnp.zeros((1, 8), jnp.int32)
        params = EncoderDecoder(model).init(jax.random.key(0), ids, ids, deterministic=True)
        hf.save_pretrained(model, params["params"], _fresh(tmp))
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**config, **hf_config}, indent=2) + "\n")

    # Written aside under a lock, then renamed: concurrent runs never see half a directory.
    return build_once(Path(tempfile.gettempdir()) / f"lmflax-{name}-tiny-{digest}", write)


def seq2seq_from_checkpoint(cfg: Any, directory: str | Path, *, tiny: bool, seq_len: int) -> Any:
    """`cfg` (a seq2seq fine-tuning Config) started from the encoder-decoder checkpoint in
    `directory`: its model (init_from), tokenizer and decoding conventions (hf.seq2seq_settings),
    and lengths within its position table. tiny: the `:tiny` run (a random checkpoint, lmflax's
    BPE trained on the data, rows of `seq_len` source tokens, 60 steps)."""
    changes: dict[str, Any] = {
        "model": hf.model_config(directory),
        "data.tokenizer": "bpe" if tiny else f"hf:{directory}",
        **hf.seq2seq_settings(directory),
    }
    if tiny:
        changes.update(
            {
                "task.target_len": 32,
                "data": dataclasses.replace(
                    cfg.data, batch_size=8, seq_len=seq_len, tokenizer_train_docs=2000
                ),
                "train": dataclasses.replace(
                    cfg.train, steps=60, log_every=10, checkpoint_every=30, eval_every=0
                ),
                "optimizer.learning_rate": 1e-3,
                "optimizer.warmup_steps": 10,
                "generate.eval_examples": 16,
            }
        )
    else:
        # Lengths within the checkpoint's positions (generation also feeds the start token).
        positions = changes["model"].max_len
        target_len = min(cfg.task.target_len, positions - 1)
        limit = changes.get("generate.max_new_tokens", target_len)
        changes["task.target_len"] = target_len
        changes["data.seq_len"] = min(cfg.data.seq_len, positions)
        changes["generate.max_new_tokens"] = min(limit, target_len)
    return override(cfg, changes)
