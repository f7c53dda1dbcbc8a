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
from pathlib import Path

from lmflax import hf
from lmflax.config import (
    Config,
    ConfigError,
    DataConfig,
    OptimizerConfig,
    TaskConfig,
    TrainConfig,
)
from lmflax.configs.finetune import tiny_llama_checkpoint


def get_config(arg: str = "") -> Config:
    if not arg:
        raise ConfigError(
            "give the model: configs/finetune/llama_lm.py:/path/to/hf-model-dir (or :tiny)"
        )
    tiny = arg == "tiny"
    directory = tiny_llama_checkpoint() if tiny else Path(arg).expanduser()
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
