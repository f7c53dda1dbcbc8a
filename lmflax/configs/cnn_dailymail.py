"""Abstractive summarization of CNN/DailyMail news articles into their highlights with a
T5-small-style encoder-decoder (relative position bias, pre-norm RMSNorm): 512 article tokens
in, at most 128 summary tokens out, ROUGE-1/2/L/Lsum of beam-search summaries after training.

The data must be prepared once: lmflax data prepare cnn_dailymail
`:tiny` is the same recipe at laptop size (t5_tiny, shorter texts, a few hundred steps).
"""

import dataclasses

from lmflax.config import (
    Config,
    ConfigError,
    DataConfig,
    GenerateConfig,
    OptimizerConfig,
    TaskConfig,
    TrainConfig,
)
from lmflax.models import PRESETS


def get_config(arg=None) -> Config:
    cfg = Config(
        model=dataclasses.replace(PRESETS["t5_small"], vocab_size=32000),
        task=TaskConfig(
            name="seq2seq",
            source_key="article",
            target_key="highlights",
            target_len=128,
            metrics=("rouge",),
        ),
        data=DataConfig(
            dataset="cnn_dailymail",
            tokenizer="bpe",
            tokenizer_train_docs=50_000,
            batch_size=64,
            seq_len=512,
        ),
        train=TrainConfig(
            steps=100_000,
            log_every=100,
            checkpoint_every=5000,
            eval_every=5000,
            eval_steps=20,
            sample_prompt="",
        ),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=2000, weight_decay=0.0),
        generate=GenerateConfig(beam_size=4, length_penalty=2.0, eval_examples=1000),
    )
    if arg == "tiny":
        return dataclasses.replace(
            cfg,
            model=dataclasses.replace(PRESETS["t5_tiny"], vocab_size=4096),
            task=dataclasses.replace(cfg.task, target_len=32),
            data=dataclasses.replace(
                cfg.data, batch_size=16, seq_len=256, tokenizer_train_docs=5_000
            ),
            train=dataclasses.replace(
                cfg.train, steps=400, log_every=10, checkpoint_every=100, eval_every=0
            ),
            optimizer=dataclasses.replace(cfg.optimizer, warmup_steps=50),
            generate=dataclasses.replace(cfg.generate, eval_examples=32),
        )
    if arg is not None:
        raise ConfigError(f"unknown variant {arg!r} of cnn_dailymail; accepted: 'tiny'")
    return cfg
