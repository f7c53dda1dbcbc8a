"""The default: a tiny GPT on the embedded Python-stdlib corpus, minutes on a laptop CPU."""

from lmflax.config import Config, DataConfig, OptimizerConfig, TaskConfig, TrainConfig
from lmflax.models import PRESETS


def get_config() -> Config:
    return Config(
        model=PRESETS["gpt_tiny"],
        task=TaskConfig(name="causal_lm"),
        data=DataConfig(dataset="lmflax_pystdlib", tokenizer="bpe", batch_size=16, seq_len=128),
        train=TrainConfig(steps=400, log_every=10, checkpoint_every=100, eval_steps=10),
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=50, weight_decay=0.1),
    )
