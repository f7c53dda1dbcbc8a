"""A tiny BERT trained with masked language modelling on the embedded corpus."""

from lmflax.config import Config, DataConfig, OptimizerConfig, TaskConfig, TrainConfig
from lmflax.models import PRESETS


def get_config() -> Config:
    return Config(
        model=PRESETS["bert_tiny"],
        task=TaskConfig(name="mlm"),
        data=DataConfig(
            dataset="lmflax_pystdlib", tokenizer="wordpiece", batch_size=16, seq_len=128
        ),
        train=TrainConfig(steps=400, log_every=10, checkpoint_every=100, eval_steps=10),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=50, b2=0.999, weight_decay=0.01),
    )
