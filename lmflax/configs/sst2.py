"""Sentiment: SST-2 (glue/sst2, 67k movie-review phrases, 2 classes) with a tiny BERT classifier.

From Hugging Face BERT weights instead of a from-scratch tiny model, e.g.:
  --config.model=bert_base --config.data.tokenizer=hf:DIR --config.optimizer.learning_rate=2e-5
(plus the model's import setting once the checkpoint importer is in).
"""

import dataclasses

from lmflax.config import TaskConfig, override
from lmflax.configs import bert_tiny


def get_config():
    cfg = bert_tiny.get_config()
    return override(
        cfg,
        {
            "task": TaskConfig(name="classification", num_labels=2),
            "data": dataclasses.replace(
                cfg.data,
                dataset="glue/sst2",
                eval_split="validation",
                tokenizer="wordpiece",
                seq_len=64,
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
