"""LoRA fine-tuning of a Llama-family decoder as a causal LM: rank-16 adapters on every attention
and MLP projection, the frozen base stored in bfloat16, only the adapters trained.

  lmflax train --config=finetune/llama_lora:/path/to/hf-llama-dir     # from its weights
  lmflax train --config=finetune/llama_lora:tiny                      # llama_tiny, here
  lmflax plan  --config=finetune/llama_lora:8b --topology=v5e:2x4     # Llama-3-8B shapes

`:8b` has Llama-3-8B's shapes (32 layers of 4096, 32 query / 8 key-value heads, d_ff 14336,
a 128,256-token vocabulary, llama3 RoPE) with random frozen weights: for planning whether a
mesh fits before downloading anything. The data is the embedded corpus (causal LM over every
token); finetune/llama_instruct is instruction tuning, the prompt masked out of the loss.
"""

import dataclasses
from pathlib import Path

from lmflax import hf
from lmflax.config import (
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    OptimizerConfig,
    TaskConfig,
    TrainConfig,
)
from lmflax.models import PRESETS
from lmflax.models.config import LoraConfig

LORA = LoraConfig(
    rank=16,
    alpha=32.0,
    targets=("attention/(query|key|value|out)", "mlp/(wi|wi_gate|wo)"),
    base_dtype="bfloat16",
)
LLAMA3_8B = dataclasses.replace(
    PRESETS["llama_tiny"],
    vocab_size=128_256,
    num_layers=32,
    d_model=4096,
    num_heads=32,
    num_kv_heads=8,
    d_ff=14_336,
    max_len=8192,
    rope_base=500_000.0,
    rope_scaling="llama3",
    rope_scaling_factor=8.0,
    rope_original_max_len=8192,
    norm_eps=1e-5,
    dtype="bfloat16",
    param_dtype="bfloat16",
    scan_layers=True,
    remat="full",
)


def get_config(arg: str = "") -> Config:
    if not arg:
        raise ConfigError(
            "give the model: finetune/llama_lora:/path/to/hf-model-dir (or :tiny, or :8b)"
        )
    data = DataConfig(dataset="lmflax_pystdlib", tokenizer="bpe", batch_size=8, seq_len=64)
    train = TrainConfig(steps=400, log_every=10, checkpoint_every=100, eval_steps=10)
    optimizer = OptimizerConfig(learning_rate=2e-4, warmup_steps=20, weight_decay=0.0)
    if arg == "tiny":
        model = dataclasses.replace(PRESETS["llama_tiny"], lora=LORA)
        train = dataclasses.replace(train, steps=60, checkpoint_every=30, sample_tokens=16)
    elif arg == "8b":
        model = dataclasses.replace(LLAMA3_8B, lora=LORA)
        data = dataclasses.replace(data, batch_size=16, seq_len=2048)
        return Config(
            model=model,
            task=TaskConfig(name="causal_lm"),
            data=data,
            train=train,
            optimizer=optimizer,
            mesh=MeshConfig(data=1, fsdp=-1),
        )
    else:
        directory = Path(arg).expanduser()
        model = dataclasses.replace(hf.model_config(directory, dropout_rate=0.0), lora=LORA)
        data = dataclasses.replace(data, tokenizer=f"hf:{directory}", batch_size=16, seq_len=512)
    return Config(
        model=model, task=TaskConfig(name="causal_lm"), data=data, train=train, optimizer=optimizer
    )
