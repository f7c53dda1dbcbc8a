"""A 1.3B GPT (24 × 2048, 16 heads) at 8 × 2048 tokens on one device: bf16 compute, float32
weights and AdamW state, scanned layers, no remat, no dropout (the plain-Flax peer's setting).
ARG 'base' or 'tuned' (the default: fused q/k/v matmul, chunked loss)."""

from configs import gpt2_small
from lmflax.config import override
from lmflax.models import PRESETS


def get_config(arg: str = "tuned"):
    if arg not in ("base", "tuned"):
        raise ValueError(f"gpt_1p3b.py takes 'base' or 'tuned', got {arg!r}")
    updates = {
        "model": PRESETS["gpt_1p3b"],
        "model.dtype": "bfloat16",
        "model.scan_layers": True,
        "data.batch_size": 8,
        "data.seq_len": 2048,
    }
    if arg == "tuned":
        updates |= {"model.fused_qkv": True, "task.loss_chunk_size": 256}
    return override(gpt2_small.get_config(), updates)
