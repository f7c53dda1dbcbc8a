"""BERT-base (12 layers × 768, 12 heads, 110M) with MLM. Differs from bert_tiny only in the
model, batch and schedule."""

import dataclasses

from lmflax.config import override
from lmflax.configs import bert_tiny
from lmflax.models import PRESETS


def get_config():
    cfg = bert_tiny.get_config()
    return override(
        cfg,
        {
            "model": PRESETS["bert_base"],
            "data": dataclasses.replace(cfg.data, batch_size=256),
            "optimizer": dataclasses.replace(
                cfg.optimizer, learning_rate=1e-4, warmup_steps=10_000
            ),
            "train": dataclasses.replace(
                cfg.train, steps=1_000_000, checkpoint_every=10_000, eval_every=10_000
            ),
        },
    )
