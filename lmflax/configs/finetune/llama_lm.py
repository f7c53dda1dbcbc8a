"""Fine-tuning a Llama-family decoder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)
as a causal LM on the embedded Python-stdlib corpus, starting from its Hugging Face weights:

  python train.py --config=configs/finetune/llama_lm.py:/path/to/hf-model-dir

The directory (config.json, model.safetensors, tokenizer.json) sets the whole model section
(`model=hf:DIR`: architecture settings plus init_from) and the tokenizer. `:tiny` runs on a
laptop CPU: it exports a random `llama_tiny` (lmflax.models.PRESETS) as a LlamaForCausalLM
directory under the temp dir first (lmflax.hf.save_pretrained), then fine-tunes from that with
lmflax's BPE tokenizer, so the whole export -> init_from -> train path runs without downloads.
"""

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

import jax

from lmflax import hf
from lmflax.config import (
    Config,
    ConfigError,
    DataConfig,
    OptimizerConfig,
    TaskConfig,
    TrainConfig,
)
from lmflax.models import GPT, PRESETS


def _tiny_checkpoint() -> Path:
    """A random llama_tiny saved as a Hugging Face LlamaForCausalLM directory (seed 0)."""
    model = PRESETS["llama_tiny"]
    digest = hashlib.sha256(repr(model).encode()).hexdigest()[:12]  # a new preset, a new dir
    path = Path(tempfile.gettempdir()) / f"lmflax-llama-tiny-{digest}"
    if not (path / "model.safetensors").exists():
        ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
        params = GPT(model).init(jax.random.key(0), ids, deterministic=True)["params"]
        # Written aside, then renamed: concurrent runs never see half a directory.
        part = Path(tempfile.mkdtemp(prefix=f"{path.name}.", dir=path.parent))
        hf.save_pretrained(model, params, part)
        try:
            os.rename(part, path)
        except OSError:  # another process finished first: its directory is the same
            for f in part.iterdir():
                f.unlink()
            part.rmdir()
    return path


def get_config(arg: str = "") -> Config:
    if not arg:
        raise ConfigError(
            "give the model: configs/finetune/llama_lm.py:/path/to/hf-model-dir (or :tiny)"
        )
    tiny = arg == "tiny"
    directory = _tiny_checkpoint() if tiny else Path(arg).expanduser()
    model = hf.model_config(directory, dropout_rate=0.0)
    data = DataConfig(
        dataset="lmflax_pystdlib",
        tokenizer="bpe" if tiny else f"hf:{directory}",
        batch_size=8 if tiny else 16,
        seq_len=64 if tiny else 512,
    )
    train = TrainConfig(steps=400, log_every=10, checkpoint_every=100, eval_steps=10)
    if tiny:
        train = dataclasses.replace(train, steps=60, checkpoint_every=30, sample_tokens=16)
    return Config(
        model=model,
        task=TaskConfig(name="causal_lm"),
        data=data,
        train=train,
        optimizer=OptimizerConfig(
            learning_rate=2e-3 if tiny else 2e-5, warmup_steps=10, weight_decay=0.0
        ),
    )
