"""GPT-2 small (124M; 12 layers × 768, 12 heads, 1024 positions). Differs from gpt_tiny only in
the model, sequence length, batch and schedule."""

import dataclasses

from lmflax.config import override
from lmflax.configs import gpt_tiny
from lmflax.models import PRESETS


def get_config():
    cfg = gpt_tiny.get_config()
    return override(
        cfg,
        {
            "model": PRESETS["gpt2_small"],
            "data": dataclasses.replace(cfg.data, seq_len=1024, batch_size=32),
            "optimizer": dataclasses.replace(cfg.optimizer, learning_rate=6e-4, warmup_steps=2000),
            "train": dataclasses.replace(
                cfg.train, steps=100_000, checkpoint_every=2000, eval_every=2000
            ),
        },
    )
