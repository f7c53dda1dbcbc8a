"""Autoregressive generation from decoder LMs with a KV cache.

`generate` prefills the cache with the prompt in one call, then appends one token per step inside
a jit-compiled `lax.fori_loop`. Sampling: greedy (temperature 0), temperature, top-k.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def sample_logits(
    logits: jax.Array, rng: jax.Array, *, temperature: float = 1.0, top_k: int | None = None
) -> jax.Array:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy (argmax); top_k keeps the k most
    likely tokens before sampling."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def init_cache(model: nn.Module, batch_size: int, max_len: int) -> Any:
    """Zeroed KV cache for `max_len` positions (shapes from tracing model.init, nothing run)."""
    ids = jnp.zeros((batch_size, max_len), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), ids, deterministic=True, decode=True)
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def generate(
    model: nn.Module,
    params: Any,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> jax.Array:
    """prompt [B, P] int32 -> [B, P + max_new_tokens]: the prompt followed by sampled tokens.

    `model` is a decoder LM taking (ids, positions=..., deterministic=..., decode=...) and
    returning logits [B, T, V] (lmflax.models.GPT).
    """
    B, P = prompt.shape
    total = P + max_new_tokens
    cache = init_cache(model, B, total)
    positions = jnp.broadcast_to(jnp.arange(P), (B, P))
    logits, mutated = model.apply(
        {"params": params, "cache": cache},
        prompt,
        positions=positions,
        deterministic=True,
        decode=True,
        mutable=["cache"],
    )
    out = jnp.concatenate([prompt, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)

    def body(
        i: jax.Array, carry: tuple[Any, jax.Array, jax.Array]
    ) -> tuple[Any, jax.Array, jax.Array]:
        cache, last_logits, out = carry
        token = sample_logits(
            last_logits, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k
        )
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, P + i))
        pos = jnp.full((B, 1), P + i, jnp.int32)
        step_logits, mutated = model.apply(
            {"params": params, "cache": cache},
            token[:, None],
            positions=pos,
            deterministic=True,
            decode=True,
            mutable=["cache"],
        )
        return mutated["cache"], step_logits[:, -1], out

    _, _, out = jax.lax.fori_loop(0, max_new_tokens, body, (mutated["cache"], logits[:, -1], out))
    return out
