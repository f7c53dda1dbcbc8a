"""Tiny GPT or BERT for the CPU smoke benchmark (`tiny.py:gpt`, `tiny.py:bert`): the speed
settings of the real benchmark configs at a size a laptop compiles in seconds."""

import dataclasses

from configs import bert_tiny, gpt_tiny
from lmflax.config import override


def get_config(arg: str = "gpt"):
    if arg not in ("gpt", "bert"):
        raise ValueError(f"tiny.py takes 'gpt' or 'bert', got {arg!r}")
    cfg = (gpt_tiny if arg == "gpt" else bert_tiny).get_config()
    model = dataclasses.replace(
        cfg.model,
        num_layers=2,
        d_model=64,
        num_heads=4,
        d_ff=256,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        dtype="bfloat16",
    )
    return override(cfg, {"model": model, "data.batch_size": 4, "data.seq_len": 64})
