"""Scaled dot-product attention and the multi-head attention layer (self, cross, MHA/GQA/MQA).

Layout throughout is `jax.nn.dot_product_attention`'s: q [B, T, N, H], k/v [B, S, K, H] with B
batch, T query length, S key length, N query heads, K key/value heads (K divides N), H head dim.
Query head n reads key/value head n // (N / K).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.nn.kernels import KERNELS, SegmentIds, as_mask, fused_attention
from lmflax.nn.linear import Linear, LinearParams, fused_linear
from lmflax.nn.positional import RopeScaling, apply_rope
from lmflax.nn.util import DType, constrain

IMPLEMENTATIONS = ("xla", *KERNELS)


def causal_mask(q_len: int, kv_len: int | None = None, window: int | None = None) -> jax.Array:
    """[1, 1, T, S] boolean: query i may attend key j iff j <= i + (S - T), and with a sliding
    `window` also j > i + (S - T) - window (the window most recent keys, itself included).

    With S > T the queries are the last T positions of the keys (decoding after a prefix).
    """
    S = q_len if kv_len is None else kv_len
    q_pos = jnp.arange(q_len)[:, None] + (S - q_len)
    return window_mask(q_pos, S, window)[None, None]


def window_mask(q_pos: jax.Array, kv_len: int, window: int | None = None) -> jax.Array:
    """q_pos [T, 1] (each query's key index) -> [T, S] boolean: key j is visible iff
    j <= q_pos and (with a sliding window) j > q_pos - window."""
    k_pos = jnp.arange(kv_len)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible = visible & (k_pos > q_pos - window)
    return visible


def padding_mask(kv_valid: jax.Array) -> jax.Array:
    """kv_valid [B, S] (True or nonzero = a real token) -> [B, 1, 1, S] boolean."""
    return kv_valid.astype(bool)[:, None, None, :]


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array | None = None) -> jax.Array:
    """Packed rows: attend only within one's own segment; segment 0 is padding.

    q_segments [B, T], kv_segments [B, S] (default: q_segments) -> [B, 1, T, S] boolean.
    """
    kv_segments = q_segments if kv_segments is None else kv_segments
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    return (same & (kv_segments[:, None, :] != 0))[:, None]


def combine_masks(*masks: jax.Array | SegmentIds | None) -> jax.Array | None:
    """Logical AND of the masks that are not None (broadcasting), or None if all are None.
    `SegmentIds` masks are materialised."""
    present = [as_mask(m) for m in masks if m is not None]
    if not present:
        return None
    out = present[0].astype(bool)
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects q [B, T, N, H] and k/v [B, S, K, H]; got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]}) for GQA/MQA"
        )


def attention_weights(
    q: jax.Array,
    k: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
) -> jax.Array:
    """softmax(QKᵀ/√H + bias) in float32, [B, N, T, S]; exactly 0 on masked keys.

    A row whose keys are all masked is all zeros (its output is then zero, not NaN).
    """
    _check_shapes(q, k, k)
    mask = combine_masks(mask)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    qg = q.reshape(B, T, K, G, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(B, N, T, S) / math.sqrt(H)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        mask = combine_masks(mask, causal_mask(T, S))
    if mask is not None:
        mask = jnp.broadcast_to(mask, logits.shape)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)
    return weights


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | SegmentIds | None = None,
    bias: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    implementation: str | None = None,
    is_causal: bool = False,
) -> jax.Array:
    """softmax(QKᵀ/√d_k + bias)V with a float32 softmax. q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H].

    mask: boolean, broadcastable to [B, N, T, S], True = may attend; or a `SegmentIds` (packed
    documents, padding), which fused kernels read without materialising [B, T, S]. bias: added
    to the logits, broadcastable to [B, N, T, S]. is_causal: also apply the causal mask (query i
    sees keys j <= i + S - T). dropout_rate > 0 drops attention weights and needs `dropout_rng`.
    implementation: None (the fastest path whose constraints hold: cuDNN flash attention on
    NVIDIA GPUs, Pallas splash attention on TPUs, else XLA; see lmflax.nn.kernels), or 'xla',
    'cudnn', 'splash' to insist (a kernel that cannot run raises ValueError saying why).
    Query rows with no key to attend return zeros on every path.
    """
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(
            f"unknown attention implementation {implementation!r}; accepted: None, "
            + ", ".join(repr(i) for i in IMPLEMENTATIONS)
        )
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs a dropout_rng")
    _check_shapes(q, k, v)
    fused = fused_attention(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        dropout_rate=dropout_rate,
        is_causal=is_causal,
        implementation=implementation,
    )
    if fused is not None:
        return fused
    weights = attention_weights(q, k, mask=mask, bias=bias, is_causal=is_causal)
    return weighted_values(weights, v, dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def weighted_values(
    weights: jax.Array,
    v: jax.Array,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """The second half of attention: weights [B, N, T, S] (from `attention_weights`) times
    v [B, S, K, H] -> [B, T, N, H], with dropout on the weights when dropout_rate > 0.

    `dot_product_attention`'s XLA path is exactly `weighted_values(attention_weights(...), v)`.
    """
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    B, N, T, S = weights.shape
    K, H = v.shape[2], v.shape[3]
    wg = weights.astype(v.dtype).reshape(B, K, N // K, T, S)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", wg, v)
    return out.reshape(B, T, N, H)


def head_problems(
    d_model: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None, prefix: str = ""
) -> list[str]:
    """What is wrong with these head counts (empty = nothing): kv heads must divide heads, and
    heads must divide the width unless head_dim is given. `prefix` ('model.') names the keys."""
    errs = []
    if num_heads > 0 and head_dim is None and d_model % num_heads:
        errs.append(
            f"{prefix}num_heads ({num_heads}) must divide {prefix}d_model ({d_model}) "
            f"(or set {prefix}head_dim)"
        )
    if num_kv_heads is not None and (num_kv_heads <= 0 or num_heads % num_kv_heads):
        errs.append(
            f"{prefix}num_kv_heads ({num_kv_heads}) must divide {prefix}num_heads ({num_heads}); "
            "None means num_heads"
        )
    if head_dim is not None and head_dim <= 0:
        errs.append(f"{prefix}head_dim must be > 0 or None, got {head_dim}")
    return errs


class MultiHeadAttention(nn.Module):
    """Multi-head attention with the output projection Wᴼ. x [B, T, D] -> [B, T, out_features|D].

    Self-attention when `context` is None, cross-attention over `context` [B, S, Dc] otherwise.
    num_kv_heads: None = num_heads (MHA); a divisor of num_heads gives GQA, 1 gives MQA.
    rope_base: if set, rotary position embedding is applied to queries and keys (self-attention),
    its frequencies rescaled as `rope_scaling` says.
    qkv_bias / out_bias: whether the q/k/v and the output projections have biases (None =
    use_bias; Qwen2 has q/k/v biases and none on the output).
    sliding_window: with is_causal, each query sees only the `sliding_window` most recent keys
    (itself included; Mistral), in full passes and against the cache alike.
    decode=True keeps a key/value cache in the 'cache' collection: the first (init) call sizes it
    from x's length; later calls append their T new positions and attend to everything cached.
    fused_qkv: self-attention with num_kv_heads == num_heads projects q, k and v with one
    [D] x [3, N, H] matmul; the parameters (query/key/value) are exactly those of the default.
    With `context` and decode=True the context's keys/values are cached on the first call that
    may write the cache and reused after that (an encoder-decoder's cross-attention).

    Attention weights you can see: `apply(..., mutable=["intermediates"])` sows the float32
    softmax weights [B, N, T, S] (0 on masked keys; before dropout) as
    intermediates/.../attention_weights, a 1-tuple, and computes the output from exactly them.
    Off (nothing computed or stored) unless that collection is mutable; never during init.
    """

    num_heads: int
    head_dim: int | None = None
    num_kv_heads: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    dropout_rate: float = 0.0
    rope_base: float | None = None
    rope_fraction: float = 1.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    sliding_window: int | None = None
    implementation: str | None = None
    init_std: float = 0.02
    out_init_std: float | None = None
    fused_qkv: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        is_causal: bool = False,
        positions: jax.Array | None = None,
        deterministic: bool,
        decode: bool = False,
    ) -> jax.Array:
        D = x.shape[-1]
        N = self.num_heads
        K = self.num_kv_heads or N
        for problem in head_problems(D, N, self.num_kv_heads, self.head_dim):
            raise ValueError(problem)
        H = self.head_dim or D // N
        out_features = self.out_features or D
        qkv_bias = self.use_bias if self.qkv_bias is None else self.qkv_bias
        out_bias = self.use_bias if self.out_bias is None else self.out_bias
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        dense = dict(
            use_bias=qkv_bias,
            init_std=self.init_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        kv_in = x if context is None else context
        param_kw = dict(use_bias=qkv_bias, init_std=self.init_std, param_dtype=self.param_dtype)

        if self.fused_qkv and context is None and K == N:
            # One [D] x [3, N, H] matmul; the parameters stay query/key/value.
            qkv = [
                LinearParams((N, H), ("embed", heads, "kv"), **param_kw, name=name)
                for name, heads in (("query", "heads"), ("key", "kv_heads"), ("value", "kv_heads"))
            ]
            q, k, v = fused_linear(x, qkv, self.dtype)
        else:
            q = Linear((N, H), ("embed", "heads", "kv"), name="query", **dense)(x)
            k = Linear((K, H), ("embed", "kv_heads", "kv"), name="key", **dense)(kv_in)
            v = Linear((K, H), ("embed", "kv_heads", "kv"), name="value", **dense)(kv_in)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        k = constrain(k, ("batch", "length", "kv_heads", "kv"))
        v = constrain(v, ("batch", "length", "kv_heads", "kv"))

        if self.rope_base is not None and context is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            rope = dict(base=self.rope_base, fraction=self.rope_fraction, scaling=self.rope_scaling)
            q = apply_rope(q, positions, **rope)
            k = apply_rope(k, positions, **rope)

        if decode and context is None:
            k, v, mask = self._update_cache(k, v, mask, is_causal)
            is_causal = False
        elif decode:
            k, v = self._cross_cache(k, v)
        elif is_causal and self.sliding_window is not None:
            mask = combine_masks(mask, causal_mask(q.shape[1], k.shape[1], self.sliding_window))

        dropout_rng = None
        rate = 0.0 if deterministic else self.dropout_rate
        if rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        if self.is_mutable_collection("intermediates") and not self.is_initializing():
            # Asked for the weights (apply(..., mutable=["intermediates"])): materialise them on
            # the XLA path and compute the output from exactly those weights. Otherwise nothing
            # is sown and the fused path below is untouched.
            weights = attention_weights(q, k, mask=mask, bias=bias, is_causal=is_causal)
            self.sow("intermediates", "attention_weights", weights)
            out = weighted_values(weights, v, dropout_rate=rate, dropout_rng=dropout_rng)
        else:
            out = dot_product_attention(
                q,
                k,
                v,
                mask=mask,
                bias=bias,
                dropout_rate=rate,
                dropout_rng=dropout_rng,
                implementation=self.implementation,
                is_causal=is_causal,
            )
        out = constrain(out, ("batch", "length", "heads", "kv"))
        out_std = self.init_std if self.out_init_std is None else self.out_init_std
        return Linear(
            (out_features,),
            ("heads", "kv", "embed"),
            in_dims=2,
            use_bias=out_bias,
            init_std=out_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)

    def _cross_cache(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention keys/values of a fixed context, computed once per decode.

        The first decode call that may write the cache (not `init`, which only sizes the self-
        attention cache) stores them; later calls read them back, so the projections of
        `context` above go unused and jit drops them.
        """
        if self.has_variable("cache", "cached_cross_key"):
            return (
                self.get_variable("cache", "cached_cross_key"),
                self.get_variable("cache", "cached_cross_value"),
            )
        if not self.is_initializing() and self.is_mutable_collection("cache"):
            self.put_variable("cache", "cached_cross_key", k)
            self.put_variable("cache", "cached_cross_value", v)
        return k, v

    def _update_cache(
        self, k: jax.Array, v: jax.Array, mask: jax.Array | None, is_causal: bool
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Writes the new keys/values at the cache index; returns the whole cache and its mask."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            # The init call only sizes the cache; attend over x itself.
            causal = causal_mask(k.shape[1], window=self.sliding_window) if is_causal else None
            return k, v, combine_masks(mask, causal)
        T = k.shape[1]
        S = cached_key.value.shape[1]
        i = index.value
        k = jax.lax.dynamic_update_slice(
            cached_key.value, k.astype(cached_key.value.dtype), (0, i, 0, 0)
        )
        v = jax.lax.dynamic_update_slice(
            cached_value.value, v.astype(cached_value.value.dtype), (0, i, 0, 0)
        )
        cached_key.value, cached_value.value = k, v
        index.value = i + T
        # New query t sits at absolute position i + t and sees cached keys 0..i+t.
        window = self.sliding_window if is_causal else None
        visible = window_mask((i + jnp.arange(T))[:, None], S, window)
        return k, v, combine_masks(mask, visible[None, None])
