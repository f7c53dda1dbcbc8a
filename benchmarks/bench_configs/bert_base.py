"""BERT-base MLM at 128 × 128 tokens, bf16 compute with float32 weights and AdamW state, no
dropout: the plain-Flax peer's setting. ARG 'base' is lmflax's defaults otherwise; 'tuned' (the
default) adds the speed options (fused q/k/v matmul, the MLM output layer only at the chosen
positions: at most 40 of 128, where 15% masking chooses 19 on average)."""

import dataclasses

from configs import bert_base
from lmflax.config import override


def get_config(arg: str = "tuned"):
    if arg not in ("base", "tuned"):
        raise ValueError(f"bert_base.py takes 'base' or 'tuned', got {arg!r}")
    cfg = bert_base.get_config()
    model = dataclasses.replace(
        cfg.model, dtype="bfloat16", dropout_rate=0.0, attention_dropout_rate=0.0
    )
    updates = {"model": model, "data.batch_size": 128, "data.seq_len": 128}
    if arg == "tuned":
        updates |= {"model.fused_qkv": True, "task.mlm_max_predictions": 40}
    return override(cfg, updates)
