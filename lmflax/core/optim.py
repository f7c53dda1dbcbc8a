"""The optax chain from config: clipping, AdamW (or plain SGD) with a warm-up + decay schedule,
and weight decay on kernels, embeddings and LoRA adapters only."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lmflax.config import OptimizerConfig

_DECAYED = ("kernel", "embedding", "lora_a", "lora_b")  # LoRA adapters decay like kernels


def make_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to learning_rate over warmup_steps, then cosine/linear decay to
    min_lr_ratio · learning_rate at total_steps (or constant)."""
    peak = opt.learning_rate
    warmup = min(opt.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = peak * opt.min_lr_ratio
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.min_lr_ratio)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif opt.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {opt.schedule!r}; accepted: cosine, linear, constant")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: kernels and embedding tables, not norms/biases."""

    def is_decayed(path: tuple[Any, ...], _: Any) -> bool:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(names) and names[-1] in _DECAYED

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(
    opt: OptimizerConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (tx, schedule)."""
    schedule = make_schedule(opt, total_steps)
    parts = []
    if opt.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.clip_norm))
    if opt.name == "sgd":
        if opt.weight_decay > 0:
            parts.append(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule))
    else:
        parts.append(
            optax.adamw(
                schedule,
                b1=opt.b1,
                b2=opt.b2,
                eps=opt.eps,
                weight_decay=opt.weight_decay,
                mask=decay_mask,
            )
        )
    return optax.chain(*parts), schedule
