"""GPT-2 small (124M) at 32 × 1024 tokens, bf16 compute with float32 weights and AdamW state,
no dropout: the plain-Flax peer's setting. ARG 'base' is lmflax's defaults otherwise; 'tuned'
(the default) adds the speed options (fused q/k/v matmul, chunked loss)."""

import dataclasses

from configs import gpt2_small
from lmflax.config import override


def get_config(arg: str = "tuned"):
    if arg not in ("base", "tuned"):
        raise ValueError(f"gpt2_small.py takes 'base' or 'tuned', got {arg!r}")
    cfg = gpt2_small.get_config()
    model = dataclasses.replace(
        cfg.model, dtype="bfloat16", dropout_rate=0.0, attention_dropout_rate=0.0
    )
    updates = {"model": model, "data.batch_size": 32, "data.seq_len": 1024}
    if arg == "tuned":
        updates |= {"model.fused_qkv": True, "task.loss_chunk_size": 128}
    return override(cfg, updates)
