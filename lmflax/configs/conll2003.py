"""Named entities: CoNLL-2003 (conll2003; PER, ORG, LOC, MISC as 9 BIO tags) with a tiny BERT
tagger. Tags sit on each word's first WordPiece; evaluation scores whole entities on 'dev'."""

import dataclasses

from lmflax.config import TaskConfig, override
from lmflax.configs import bert_tiny


def get_config():
    cfg = bert_tiny.get_config()
    return override(
        cfg,
        {
            "task": TaskConfig(name="tagging", num_labels=9),
            "data": dataclasses.replace(
                cfg.data,
                dataset="conll2003",
                eval_split="dev",
                tokenizer="wordpiece",
                seq_len=128,
                batch_size=32,
            ),
            "train": dataclasses.replace(
                cfg.train,
                steps=2000,
                log_every=50,
                checkpoint_every=500,
                eval_every=500,
                eval_steps=1000,
                sample_tokens=0,
            ),
            "optimizer": dataclasses.replace(cfg.optimizer, learning_rate=5e-4, warmup_steps=100),
        },
    )
