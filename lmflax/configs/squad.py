"""Extractive QA: SQuAD v1.1 (squad; 88k train / 10.6k validation questions) with a tiny BERT.
Contexts are cut into 256-token windows 128 context tokens apart; answers of at most 30 tokens;
exact match and token F1 as the official script computes them (reported as fractions)."""

import dataclasses

from lmflax.config import TaskConfig, override
from lmflax.configs import bert_tiny


def get_config():
    cfg = bert_tiny.get_config()
    return override(
        cfg,
        {
            "task": TaskConfig(name="qa", max_query_len=64, doc_stride=128, max_answer_len=30),
            "data": dataclasses.replace(
                cfg.data,
                dataset="squad",
                eval_split="validation",
                tokenizer="wordpiece",
                seq_len=256,
                batch_size=32,
            ),
            "train": dataclasses.replace(
                cfg.train,
                steps=6000,
                log_every=50,
                checkpoint_every=1000,
                eval_every=2000,
                eval_steps=1000,
                sample_tokens=0,
            ),
            "optimizer": dataclasses.replace(cfg.optimizer, learning_rate=5e-4, warmup_steps=300),
        },
    )
