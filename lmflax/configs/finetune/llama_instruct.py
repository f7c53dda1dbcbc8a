"""Instruction tuning of a Llama-family decoder with LoRA: the loss on the responses only, the
examples formatted with the tokenizer's chat template when it has one (task.chat_template).

  lmflax train --config=finetune/llama_instruct:/path/to/hf-llama-dir \\
      --config.data.dataset=jsonl:my_pairs.jsonl                          # your pairs
  lmflax train --config=finetune/llama_instruct:tiny                     # runs here
  lmflax plan  --config=finetune/llama_instruct:8b --topology=v5e:2x4    # Llama-3-8B shapes

The data is records with a 'prompt' and a 'response' text (task.source_key / target_key; any
file dataset kind, or a TFDS dataset with such features). By default it is the 388 pairs
shipped in data/pystdlib_instruct.jsonl ("What does the function `json.dumps` do?" -> the first
paragraph of its docstring; tools/make_instruct_data.py wrote them), 5% of them held out for
validation. `:DIR` starts from the directory's weights (model.init_from) with its tokenizer
(and chat template); `:tiny` from a random llama_tiny exported as a LlamaForCausalLM directory,
with a BPE vocabulary trained on the pairs and the plain '### Instruction:' format.
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
from lmflax.configs.finetune import tiny_llama_checkpoint
from lmflax.configs.finetune.llama_lora import LLAMA3_8B, LORA

PAIRS = Path(__file__).resolve().parent / "data" / "pystdlib_instruct.jsonl"


def get_config(arg: str = "") -> Config:
    if not arg:
        raise ConfigError(
            "give the model: finetune/llama_instruct:/path/to/hf-model-dir (or :tiny, or :8b)"
        )
    task = TaskConfig(name="instruct", source_key="prompt", target_key="response")
    data = DataConfig(dataset=f"jsonl:{PAIRS}", batch_size=16, seq_len=512)
    train = TrainConfig(
        steps=300,
        log_every=10,
        checkpoint_every=100,
        eval_steps=4,
        sample_prompt="What does the function `json.dumps` do?",
        sample_tokens=48,
    )
    optimizer = OptimizerConfig(learning_rate=2e-4, warmup_steps=20, weight_decay=0.0)
    mesh = MeshConfig()
    if arg == "tiny":
        directory = tiny_llama_checkpoint()
        model = dataclasses.replace(hf.model_config(directory, dropout_rate=0.0), lora=LORA)
        data = dataclasses.replace(data, tokenizer="bpe", batch_size=8, seq_len=96)
        train = dataclasses.replace(train, steps=40, checkpoint_every=20, sample_tokens=16)
        optimizer = dataclasses.replace(optimizer, learning_rate=2e-3)
    elif arg == "8b":
        model = dataclasses.replace(LLAMA3_8B, lora=LORA)
        data = dataclasses.replace(data, tokenizer="bpe", seq_len=2048)
        mesh = MeshConfig(data=1, fsdp=-1)
    else:
        directory = Path(arg).expanduser()
        model = dataclasses.replace(hf.model_config(directory, dropout_rate=0.0), lora=LORA)
        data = dataclasses.replace(data, tokenizer=f"hf:{directory}")
    return Config(model=model, task=task, data=data, train=train, optimizer=optimizer, mesh=mesh)
