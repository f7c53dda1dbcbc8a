"""word2vec (skip-gram, negative sampling) on the embedded corpus's words; minutes on a CPU.

`--config=configs/word2vec.py:cbow` trains CBOW instead. word2vec's optimizer: plain SGD whose
rate decays linearly to 1e-4 of its start, with no warm-up. The loss is the mean over the batch,
so word2vec's per-example rate α (0.025 skip-gram, 0.05 CBOW) is learning_rate = α·batch_size:
scale it with data.batch_size. Logged `tokens_per_sec` counts examples (data.seq_len is 1);
times `words_per_example` it is corpus words per second.
"""

import dataclasses

from lmflax.config import (
    Config,
    ConfigError,
    DataConfig,
    OptimizerConfig,
    TaskConfig,
    TrainConfig,
)
from lmflax.models import PRESETS

BATCH = 4096
ALPHA = {"skipgram": 0.025, "cbow": 0.05}


def get_config(arch: str = "skipgram") -> Config:
    if arch not in ALPHA:
        raise ConfigError(f"configs/word2vec.py takes 'skipgram' or 'cbow', got {arch!r}")
    return Config(
        model=dataclasses.replace(PRESETS["word2vec"], architecture=arch),
        task=TaskConfig(name="word2vec"),
        data=DataConfig(
            dataset="lmflax_pystdlib", batch_size=BATCH, seq_len=1, tokenizer_train_docs=0
        ),
        train=TrainConfig(
            steps=2000,
            log_every=50,
            checkpoint_every=500,
            eval_steps=20,
            sample_prompt="def list string return",
        ),
        optimizer=OptimizerConfig(
            name="sgd",
            learning_rate=ALPHA[arch] * BATCH,
            warmup_steps=0,
            schedule="linear",
            min_lr_ratio=0.0001,
            weight_decay=0.0,
            clip_norm=0.0,
        ),
    )
