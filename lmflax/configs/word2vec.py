"""word2vec (skip-gram, negative sampling) on the embedded corpus's words; minutes on a CPU.

`--config=configs/word2vec.py:cbow` trains CBOW instead. word2vec's optimizer: plain SGD whose
rate decays linearly to 1e-4 of its start, with no warm-up. The loss is the mean over the batch,
so word2vec's per-example rate α (0.025 skip-gram, 0.05 CBOW) is learning_rate = α·batch_size:
scale it with data.batch_size. CBOW's batch is smaller (1024 against 4096): a CBOW example is a
whole window (about 6 context words), each of which receives the example's full error, as in
word2vec.c, so a batch of B CBOW examples moves the word vectors about 6× as far as B skip-gram
pairs; summed over 4096 examples at α = 0.05 that step overshoots (benchmarks/RESULTS.md). Logged `tokens_per_sec` counts examples (data.seq_len is 1);
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

BATCH = {"skipgram": 4096, "cbow": 1024}
ALPHA = {"skipgram": 0.025, "cbow": 0.05}


def get_config(arch: str = "skipgram") -> Config:
    if arch not in ALPHA:
        raise ConfigError(f"configs/word2vec.py takes 'skipgram' or 'cbow', got {arch!r}")
    return Config(
        model=dataclasses.replace(PRESETS["word2vec"], architecture=arch),
        task=TaskConfig(name="word2vec"),
        data=DataConfig(
            dataset="lmflax_pystdlib", batch_size=BATCH[arch], seq_len=1, tokenizer_train_docs=0
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
            learning_rate=ALPHA[arch] * BATCH[arch],
            warmup_steps=0,
            schedule="linear",
            min_lr_ratio=0.0001,
            weight_decay=0.0,
            clip_norm=0.0,
        ),
    )
