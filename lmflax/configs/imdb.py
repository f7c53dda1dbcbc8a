"""Sentiment: IMDb reviews (imdb_reviews, 25k train / 25k test, 2 classes), reviews cut to 256
tokens. Differs from sst2 only in the dataset, the split it evaluates on and the lengths."""

import dataclasses

from lmflax.config import override
from lmflax.configs import sst2


def get_config():
    cfg = sst2.get_config()
    return override(
        cfg,
        {
            "data": dataclasses.replace(
                cfg.data, dataset="imdb_reviews", eval_split="test", seq_len=256
            ),
            "train": dataclasses.replace(cfg.train, steps=1600, eval_every=800, eval_steps=1000),
        },
    )
