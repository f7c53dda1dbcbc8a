"""German -> English translation on WMT'14 with the Transformer base model (Vaswani et al.
2017): a joint 32k byte-level BPE vocabulary, Adam with β₂ 0.98, beam search with 4 beams and
length penalty 0.6 for the BLEU score after training.

The data must be prepared once (about 4.5M sentence pairs):
    tfds build wmt14_translate/de-en --file_format=array_record
`:tiny` is the same recipe at laptop size (transformer_tiny, short sentences, a few hundred
steps); `--config=configs/wmt14_de_en.py:tiny`.
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
        model=dataclasses.replace(PRESETS["transformer_base"], vocab_size=32000),
        task=TaskConfig(
            name="seq2seq", source_key="de", target_key="en", target_len=128, metrics=("bleu",)
        ),
        data=DataConfig(
            dataset="wmt14_translate/de-en",
            tokenizer="bpe",
            tokenizer_train_docs=200_000,
            batch_size=256,
            seq_len=128,
        ),
        train=TrainConfig(
            steps=100_000,
            log_every=100,
            checkpoint_every=5000,
            eval_every=5000,
            eval_steps=20,
            sample_prompt="Das Haus ist wunderbar.",
        ),
        optimizer=OptimizerConfig(
            learning_rate=7e-4, warmup_steps=4000, b2=0.98, eps=1e-9, weight_decay=0.0
        ),
        generate=GenerateConfig(beam_size=4, length_penalty=0.6, eval_examples=3003),
    )
    if arg == "tiny":
        return dataclasses.replace(
            cfg,
            model=dataclasses.replace(PRESETS["transformer_tiny"], vocab_size=4096),
            task=dataclasses.replace(cfg.task, target_len=48),
            data=dataclasses.replace(
                cfg.data, batch_size=32, seq_len=48, tokenizer_train_docs=20_000
            ),
            train=dataclasses.replace(
                cfg.train, steps=400, log_every=10, checkpoint_every=100, eval_every=0
            ),
            optimizer=dataclasses.replace(cfg.optimizer, learning_rate=2e-3, warmup_steps=50),
            generate=dataclasses.replace(cfg.generate, eval_examples=64),
        )
    if arg is not None:
        raise ConfigError(f"unknown variant {arg!r} of wmt14_de_en; accepted: 'tiny'")
    return cfg
