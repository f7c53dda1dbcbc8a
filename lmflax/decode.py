"""Autoregressive decoding with a KV cache, for decoder LMs (GPT) and encoder-decoders.

Everything is batched and jit-compiled:
- `prefill` runs the prompt through the model in one call, filling the self-attention cache
  (and, for an encoder-decoder, encoding the inputs once: every cross-attention layer caches the
  encoder's keys/values on this call and only reads them afterwards). `decode_step` then feeds
  one token per row.
- Prompts of different lengths are left-padded to a common length P (`left_pad`); `prompt_mask`
  marks the real tokens. Positions count real tokens only and the cache's key mask hides the
  padding, so a padded row decodes exactly as it would alone, and every row writes its t-th new
  token to cache slot P + t (one cache index for the whole batch).
- `generate`: greedy (temperature 0), temperature, top-k and top-p (nucleus) sampling, stopping
  at EOS. `beam_search`: beam search with the GNMT length penalty and early stopping, returning
  the highest-scoring finished hypotheses. Both take `encoder_inputs` for encoder-decoders.
- Under a mesh (`jax.set_mesh` + `nn.logical_axis_rules`) the model's logical constraints shard
  the batch and heads as in training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lmflax.models.seq2seq import positions_from_mask

# Log-probability of beams that do not exist (finite, so arithmetic on it never makes NaNs).
NEG_INF = -1.0e7

_KV_LEAVES = ("cached_key", "cached_value", "cached_cross_key", "cached_cross_value")
_CROSS_LEAVES = ("cached_cross_key", "cached_cross_value")

# ---------------------------------------------------------------------------------------------
# Choosing tokens


def filter_logits(
    logits: jax.Array, *, top_k: int | None = None, top_p: float | None = None
) -> jax.Array:
    """logits [..., V] -> float32 logits with everything outside the kept set at -inf.

    top_k keeps the k largest (ties with the k-th are kept too). top_p keeps the smallest set of
    most likely tokens whose probability mass reaches p: tokens sorted by probability, token j is
    kept iff the mass of the tokens before it is < p (so the most likely token always is).
    """
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if top_k < V:
            kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        concrete = isinstance(top_p, int | float)
        if concrete and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        if not concrete or top_p < 1.0:
            order = jnp.argsort(-logits, axis=-1, stable=True)
            sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            keep_sorted = mass_before < top_p
            # Back to vocabulary order: exactly the kept prefix, whatever ties there are.
            keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
            logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """logits [B, V] -> token ids [B] int32. temperature 0 is greedy (argmax); otherwise the
    logits are divided by the temperature, filtered by top_k then top_p (`filter_logits`), and
    sampled."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Constraints(NamedTuple):
    """Tokens forced or banned while decoding, as Hugging Face `generate` applies them.

    forced_bos_id: the first new token (transformers' `forced_bos_token_id`: BART's <s> after the
    decoder start). forced_eos_id: the last of max_new_tokens (`forced_eos_token_id`: a
    hypothesis cut at the length limit still ends with EOS). banned_ids: never chosen
    (`bad_words_ids` of single tokens: Marian bans its pad token, which is also its decoder
    start). min_new_tokens: EOS is not chosen before this many new tokens (`min_new_tokens`;
    an encoder-decoder's `min_length` counts its decoder start too, so it is min_length - 1).
    no_repeat_ngram_size n: no token that would repeat an n-gram already in the sequence (the
    prompt, or the decoder's start tokens, and what was generated; `no_repeat_ngram_size`).
    repetition_penalty p: the score of every token already in the sequence is divided by p when
    positive and multiplied by p when negative (Keskar et al. 2019, transformers'
    `repetition_penalty`; as there, a left-padded prompt's leading pads are not in the sequence,
    while the n-gram check does see them). encoder_repetition_penalty p: the reverse for the
    tokens of the source (an encoder-decoder's encoder inputs, a decoder's prompt, pads
    included, as transformers' `encoder_repetition_penalty`): positive scores times p, negative
    ones divided by p, so p > 1 favours copying from the source. None / () / 0 / 1.0 = off.
    Hashable, so it can be a static argument of a jitted function.
    """

    forced_bos_id: int | None = None
    forced_eos_id: int | None = None
    banned_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    encoder_repetition_penalty: float = 1.0

    @property
    def needs_history(self) -> bool:
        """Whether `constrain_scores` reads the sequence so far."""
        return self.no_repeat_ngram_size > 0 or self.repetition_penalty != 1.0

    @property
    def active(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.encoder_repetition_penalty != 1.0
            or self.forced_bos_id is not None
            or self.forced_eos_id is not None
            or bool(self.banned_ids)
            or self.min_new_tokens > 0
            or self.no_repeat_ngram_size > 0
        )


NO_CONSTRAINTS = Constraints()


def repeated_ngram_tokens(history: jax.Array, length: jax.Array | int, n: int, V: int) -> jax.Array:
    """history [R, L] int32 (the first `length` positions are the sequence so far) -> [R, V]
    bool: the tokens that would complete an n-gram already in the sequence, i.e. those that
    followed an earlier occurrence of its last n - 1 tokens (none while length < n)."""
    rows, size = history.shape
    if n > size:
        return jnp.zeros((rows, V), bool)
    starts = jnp.arange(size - n + 1)  # j: the n-gram history[j : j + n]
    match = starts + n - 1 < length  # ... lies wholly before the next token
    if n > 1:
        # The last n - 1 tokens, history[length - n + 1 : length] (left padding never matches,
        # since a match also needs j >= 0 above).
        padded = jnp.pad(history, ((0, 0), (n, 0)), constant_values=-1)
        tail = jax.lax.dynamic_slice_in_dim(padded, length + 1, n - 1, axis=1)
        windows = jnp.stack([history[:, k : size - n + 1 + k] for k in range(n - 1)], axis=-1)
        match = match & jnp.all(windows == tail[:, None, :], axis=-1)
    follow = history[:, n - 1 :]  # the token that completed each earlier n-gram
    return _token_set(follow, match, V)


def _token_set(tokens: jax.Array, where: jax.Array, V: int) -> jax.Array:
    """tokens [R, K] int32, where [R, K] or [K] bool -> [R, V] bool: per row, the tokens at the
    positions `where` marks."""
    rows = tokens.shape[0]
    hits = (
        jnp.zeros((rows, V), jnp.int32)
        .at[jnp.arange(rows)[:, None], tokens]
        .max(jnp.broadcast_to(where, tokens.shape).astype(jnp.int32))
    )
    return hits > 0


def tokens_present(
    history: jax.Array, length: jax.Array | int, V: int, start: jax.Array | int = 0
) -> jax.Array:
    """history [R, L] int32 (positions start..length-1 are the sequence so far; start an int or
    [R], e.g. each row's count of leading pads) -> [R, V] bool: the tokens that occur there."""
    rows, size = history.shape
    position = jnp.arange(size)[None, :]
    start = jnp.broadcast_to(jnp.asarray(start, jnp.int32).reshape(-1, 1), (rows, 1))
    return _token_set(history, (position >= start) & (position < length), V)


def _penalize(scores: jax.Array, marked: jax.Array, penalty: float) -> jax.Array:
    """scores [B, V] with the marked [B, V] ones moved toward less likely by `penalty` > 0:
    divided by it when positive, multiplied when negative (a penalty below 1 favours them)."""
    return jnp.where(marked, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def leading_pads(mask: jax.Array | None, rows: int) -> jax.Array:
    """mask [R, P] (nonzero = real token; None = all real) -> [R] int32: each row's count of
    leading pads, as transformers counts them (the position of the first real token)."""
    if mask is None or mask.shape[1] == 0:
        return jnp.zeros((rows,), jnp.int32)
    return jnp.argmax(mask != 0, axis=1).astype(jnp.int32)


def _source_tokens(source: jax.Array | None, constraints: Constraints, V: int) -> jax.Array | None:
    """source [B, S] -> [B, V] bool, the tokens encoder_repetition_penalty rewards (None when
    it is off or there is no source): once per decoding, not at every step."""
    if source is None or constraints.encoder_repetition_penalty == 1.0:
        return None
    return tokens_present(source.astype(jnp.int32), source.shape[1], V)


def constrain_scores(
    scores: jax.Array,
    step: jax.Array | int,
    max_new_tokens: int,
    constraints: Constraints,
    *,
    eos_id: int | None = None,
    history: jax.Array | None = None,
    length: jax.Array | int | None = None,
    start: jax.Array | int = 0,
    in_source: jax.Array | None = None,
) -> jax.Array:
    """scores [B, V] (logits or log-probabilities) of new token `step` (0-based) -> float32
    scores with the encoder repetition penalty applied to the tokens in_source [B, V] marks
    (`tokens_present` of the source, computed once per decoding), the repetition penalty to
    the tokens of history [B, L] (whose first `length` positions are the sequence so far; the
    penalty skips each row's first `start`, an int or [B]: a left-padded prompt's pads),
    banned tokens at -inf (and EOS before min_new_tokens, and tokens repeating an n-gram of the
    history), and at a forced step every token but the forced one at -inf and the forced one at
    0 (transformers' processors do exactly this, in this order, to the log-probabilities in
    beam search and to the logits in greedy search and sampling)."""
    scores = scores.astype(jnp.float32)
    if not constraints.active:
        return scores
    V = scores.shape[-1]
    vocab = jnp.arange(V)
    if constraints.needs_history and (history is None or length is None):
        raise ValueError(
            "no_repeat_ngram_size and repetition_penalty need the sequence so far (history, length)"
        )
    for name in ("encoder_repetition_penalty", "repetition_penalty"):
        if not getattr(constraints, name) > 0:
            raise ValueError(f"{name} must be > 0 (1.0 = off), got {getattr(constraints, name)}")
    if constraints.encoder_repetition_penalty != 1.0:
        if in_source is None:
            raise ValueError("encoder_repetition_penalty needs the source's tokens (in_source)")
        # transformers applies the reciprocal as a repetition penalty: the same arithmetic.
        scores = _penalize(scores, in_source, 1 / constraints.encoder_repetition_penalty)
    if constraints.repetition_penalty != 1.0:
        seen = tokens_present(history, length, V, start)
        scores = _penalize(scores, seen, constraints.repetition_penalty)
    if constraints.banned_ids:
        banned = jnp.isin(vocab, jnp.asarray(constraints.banned_ids, jnp.int32))
        scores = jnp.where(banned, -jnp.inf, scores)
    if constraints.min_new_tokens > 0 and eos_id is not None:
        early = (vocab == eos_id) & (step < constraints.min_new_tokens)
        scores = jnp.where(early, -jnp.inf, scores)
    if constraints.no_repeat_ngram_size > 0:
        repeats = repeated_ngram_tokens(history, length, constraints.no_repeat_ngram_size, V)
        scores = jnp.where(repeats, -jnp.inf, scores)
    for token, at in (
        (constraints.forced_bos_id, 0),
        (constraints.forced_eos_id, max_new_tokens - 1),
    ):
        if token is not None:
            if not 0 <= token < V:
                raise ValueError(f"forced token id {token} is outside the vocabulary [0, {V})")
            only = jnp.where(vocab == token, 0.0, -jnp.inf)
            scores = jnp.where(step == at, jnp.broadcast_to(only, scores.shape), scores)
    return scores


LENGTH_PENALTIES = ("gnmt", "hf")
EARLY_STOPPING = (None, True, False, "never")
# A config's generate.early_stopping (lmflax.config.GenerateConfig) -> early_stopping.
EARLY_STOPPING_NAMES = {"exact": None, "true": True, "false": False, "never": "never"}


def length_penalty(length: jax.Array | int, alpha: float, form: str = "gnmt") -> jax.Array:
    """The length normaliser a hypothesis' log-probability is divided by; 1 when alpha = 0.

    form 'gnmt': ((5 + length) / 6)^alpha (Wu et al. 2016); 'hf': length^alpha (Hugging Face
    transformers' `length_penalty`, length counting the generated tokens and the EOS).
    """
    length = jnp.asarray(length, jnp.float32)
    if form == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if form == "hf":
        return length**alpha
    raise ValueError(f"unknown length penalty form {form!r}; accepted: {LENGTH_PENALTIES}")


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids [B, P] int32 right-aligned, mask [B, P] int32, 1 = real token).

    P is the longest list (or `length`). Every list needs at least one token.
    """
    if not sequences:
        raise ValueError("left_pad needs at least one sequence")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError(f"every prompt needs at least one token; lengths are {lengths}")
    P = max(lengths) if length is None else length
    if max(lengths) > P:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit length={P}")
    ids = np.full((len(sequences), P), pad_id, np.int32)
    mask = np.zeros((len(sequences), P), np.int32)
    for b, s in enumerate(sequences):
        ids[b, P - len(s) :] = np.asarray(s, np.int32)
        mask[b, P - len(s) :] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# The cache and one step


@struct.dataclass
class DecodeState:
    """What decoding carries between steps; every array but `index` has a batch axis.

    kv_mask [B, P + N]: which cache slots hold real tokens (left padding is 0). lengths [B]: real
    prompt tokens per row (the next position is lengths + index). index: tokens fed after the
    prompt. encoder_mask [B, S] or None: the encoder's padding (encoder-decoders).
    """

    cache: Any
    kv_mask: jax.Array
    lengths: jax.Array
    index: jax.Array
    encoder_mask: jax.Array | None = None
    is_seq2seq: bool = struct.field(pytree_node=False, default=False)


def _is_seq2seq(model: nn.Module) -> bool:
    return callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))


def _check_length(model: nn.Module, total: int, what: str) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "position", None) not in ("learned", "sinusoidal"):
        return
    if total > cfg.max_len:
        raise ValueError(
            f"{what} needs {total} positions but the model's {cfg.position} positions stop at "
            f"model.max_len={cfg.max_len}; shorten the prompt or max_new_tokens"
        )


def init_cache(
    model: nn.Module,
    batch_size: int,
    max_len: int,
    *,
    encoded: jax.Array | None = None,
    encoder_mask: jax.Array | None = None,
) -> Any:
    """Zeroed self-attention KV cache for `max_len` positions (shapes from tracing model.init,
    nothing run). For an encoder-decoder pass `encoded` [B, S, D] (and its mask); the
    cross-attention entries are added by the first decoding call (see `prefill`)."""
    ids = jnp.zeros((batch_size, max_len), jnp.int32)
    if encoded is None:
        fn = lambda: model.init(jax.random.key(0), ids, deterministic=True, decode=True)  # noqa: E731
    else:

        def fn() -> Any:
            return model.init(
                jax.random.key(0),
                encoded,
                ids,
                inputs_mask=encoder_mask,
                decoder_mask=jnp.ones_like(ids),
                deterministic=True,
                decode=True,
                method="decode",
            )

    shapes = jax.eval_shape(fn)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _apply(
    model: nn.Module,
    params: Any,
    state: DecodeState,
    ids: jax.Array,
    positions: jax.Array,
    encoded: jax.Array | None,
) -> tuple[jax.Array, Any]:
    variables = {"params": params, "cache": state.cache}
    if state.is_seq2seq:
        logits, mutated = model.apply(
            variables,
            encoded,
            ids,
            inputs_mask=state.encoder_mask,
            decoder_positions=positions,
            decoder_mask=state.kv_mask,
            deterministic=True,
            decode=True,
            mutable=["cache"],
            method="decode",
        )
    else:
        logits, mutated = model.apply(
            variables,
            ids,
            positions=positions,
            attention_mask=state.kv_mask,
            deterministic=True,
            decode=True,
            mutable=["cache"],
        )
    return logits, mutated["cache"]


def prefill(
    model: nn.Module,
    params: Any,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    prompt_mask: jax.Array | None = None,
    encoder_inputs: jax.Array | None = None,
    encoder_mask: jax.Array | None = None,
) -> tuple[jax.Array, DecodeState]:
    """Runs the prompt [B, P] (left-padded; prompt_mask [B, P], 1 = real) through the model with
    a fresh cache sized for P + max_new_tokens. Returns logits [B, P, V] and the state.

    A decoder LM (GPT) takes the prompt as its input ids. An encoder-decoder (a model with
    `encode` and `decode`) also needs `encoder_inputs` [B, S] (and encoder_mask [B, S]); the
    prompt is then the decoder's start (e.g. [[start_id]] * B) or a forced prefix.
    """
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be [batch, length] token ids, got shape {prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, P = prompt.shape
    if prompt_mask is not None and prompt_mask.shape != prompt.shape:
        raise ValueError(
            f"prompt_mask {prompt_mask.shape} must have the prompt's shape {prompt.shape}"
        )
    seq2seq = _is_seq2seq(model)
    if seq2seq != (encoder_inputs is not None):
        raise ValueError(
            "an encoder-decoder needs encoder_inputs and a decoder LM takes none; got "
            f"{type(model).__name__} with encoder_inputs={'given' if encoder_inputs is not None else None}"
        )
    total = P + max_new_tokens
    _check_length(model, total, f"a prompt of {P} tokens plus {max_new_tokens} new ones")
    mask = jnp.ones((B, P), jnp.int32) if prompt_mask is None else prompt_mask.astype(jnp.int32)
    encoded = None
    if seq2seq:
        _check_length(model, encoder_inputs.shape[1], "the encoder inputs")
        encoded = model.apply(
            {"params": params},
            encoder_inputs,
            inputs_mask=encoder_mask,
            deterministic=True,
            method="encode",
        )
        cache = init_cache(model, B, total, encoded=encoded, encoder_mask=encoder_mask)
    else:
        cache = init_cache(model, B, total)
    state = DecodeState(
        cache=cache,
        kv_mask=jnp.concatenate([mask, jnp.ones((B, max_new_tokens), jnp.int32)], axis=1),
        lengths=jnp.sum(mask, axis=1),
        index=jnp.zeros((), jnp.int32),
        encoder_mask=encoder_mask,
        is_seq2seq=seq2seq,
    )
    logits, cache = _apply(model, params, state, prompt, positions_from_mask(mask), encoded)
    return logits, state.replace(cache=cache)


def decode_step(
    model: nn.Module, params: Any, state: DecodeState, tokens: jax.Array
) -> tuple[jax.Array, DecodeState]:
    """Feeds tokens [B] (one per row) at the next position; returns logits [B, V] for the token
    after them and the advanced state."""
    positions = (state.lengths + state.index)[:, None]
    encoded = None
    if state.is_seq2seq:
        # Cross-attention reads the encoder's keys/values from the cache; `encoded` only has to
        # be present (its projections are dead code), so a [B, 1, D] stand-in saves the memory.
        D = model.config.d_model
        encoded = jnp.zeros((tokens.shape[0], 1, D), jnp.float32)
    logits, cache = _apply(model, params, state, tokens[:, None], positions, encoded)
    return logits[:, -1], state.replace(cache=cache, index=state.index + 1)


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_loop(
    step_fn: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
    state: Any,
    logits: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    return_logits: bool = False,
    constraints: Constraints = NO_CONSTRAINTS,
    prefix: jax.Array | None = None,
    prefix_mask: jax.Array | None = None,
    source: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Draws max_new_tokens tokens per row -> [B, N] int32 (and with return_logits the float32
    logits [B, N, V] each token was drawn from; zeros after an early stop). prefix [B, P]: the
    tokens before the new ones (the prompt), which no_repeat_ngram_size and repetition_penalty
    also look at (prefix_mask [B, P]: its real tokens; the penalty skips leading pads); source
    [B, S]: the tokens encoder_repetition_penalty rewards.

    logits [B, V] predict the first token; step_fn(state, tokens [B]) -> (next logits, state).
    A row that emits eos_id is finished: the rest of it is pad_id, and the loop stops once every
    row is finished. Token t is drawn with fold_in(rng, t), from the logits after
    `constrain_scores` (forced and banned tokens).
    """
    B, V = logits.shape
    N = max_new_tokens
    out = jnp.full((B, N), pad_id, jnp.int32)
    seen = jnp.zeros((B, N, V) if return_logits else (0,), jnp.float32)

    def cond(carry: tuple) -> jax.Array:
        i, _, _, _, done, _ = carry
        return (i < N) & ~jnp.all(done)

    before = jnp.zeros((B, 0), jnp.int32) if prefix is None else prefix.astype(jnp.int32)
    pads = leading_pads(prefix_mask, B)
    in_source = _source_tokens(source, constraints, V)

    def body(carry: tuple) -> tuple:
        i, state, logits, out, done, seen = carry
        history = None  # the sequence so far: only the n-gram check and the penalty read it
        if constraints.needs_history:
            history = jnp.concatenate([before, out], axis=1)
        logits = constrain_scores(
            logits, i, N, constraints, eos_id=eos_id, history=history,
            length=before.shape[1] + i, start=pads, in_source=in_source,
        )  # fmt: skip
        token = sample_logits(
            logits, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k, top_p=top_p
        )
        token = jnp.where(done, pad_id, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        if return_logits:
            step_logits = logits.astype(jnp.float32)[:, None]
            seen = jax.lax.dynamic_update_slice(seen, step_logits, (0, i, 0))
        if eos_id is not None:
            done = done | (token == eos_id)
        logits, state = step_fn(state, token)
        return i + 1, state, logits, out, done, seen

    init = (jnp.zeros((), jnp.int32), state, logits, out, jnp.zeros((B,), bool), seen)
    _, _, _, out, _, seen = jax.lax.while_loop(cond, body, init)
    return (out, seen) if return_logits else out


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "eos_id",
        "pad_id",
        "return_logits",
        "constraints",
    ),
)
def generate(
    model: nn.Module,
    params: Any,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    prompt_mask: jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    encoder_inputs: jax.Array | None = None,
    encoder_mask: jax.Array | None = None,
    return_logits: bool = False,
    constraints: Constraints = NO_CONSTRAINTS,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """prompt [B, P] int32 -> [B, P + max_new_tokens]: the prompt followed by sampled tokens
    (with return_logits also the logits [B, N, V] every new token was chosen from).

    `model` is a decoder LM taking (ids, positions=, attention_mask=, deterministic=, decode=)
    and returning logits [B, T, V] (lmflax.models.GPT), or an encoder-decoder
    (lmflax.models.EncoderDecoder) with `encoder_inputs` [B, S] (+ encoder_mask), the prompt
    being the decoder's start tokens. prompt_mask [B, P] marks real tokens of left-padded
    prompts. temperature 0 is greedy; top_k / top_p filter before sampling. After eos_id a row
    is filled with pad_id. `constraints`: tokens forced or banned (see `Constraints`).
    """
    logits, state = prefill(
        model,
        params,
        prompt,
        max_new_tokens=max_new_tokens,
        prompt_mask=prompt_mask,
        encoder_inputs=encoder_inputs,
        encoder_mask=encoder_mask,
    )
    new = sample_loop(
        functools.partial(decode_step, model, params),
        state,
        logits[:, -1],
        rng,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        pad_id=pad_id,
        return_logits=return_logits,
        constraints=constraints,
        prefix=prompt,
        prefix_mask=prompt_mask,
        source=prompt if encoder_inputs is None else encoder_inputs,
    )
    if return_logits:
        new, seen = new
        return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1), seen
    return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1)


# ---------------------------------------------------------------------------------------------
# Beam search


class BeamOutput(NamedTuple):
    """sequences [B, W, N] (new tokens, pad_id after EOS), scores [B, W] (log-probability /
    length_penalty), finished [B, W] (ended with EOS). Beams are sorted: finished ones first,
    by score; sequences[:, 0] is the answer. steps: how many tokens the search ran for (fewer
    than N when it stopped early)."""

    sequences: jax.Array
    scores: jax.Array
    finished: jax.Array
    steps: jax.Array


def _batch_axis(path: tuple, leaf: jax.Array) -> int | None:
    """Where the batch axis of a decoding-state leaf is: attention caches are [..., B, S, K, H]
    (a leading layer axis when the stack is scanned); cache indices have none."""
    name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
    if name in _KV_LEAVES:
        return leaf.ndim - 4
    if name == "cache_index" or leaf.ndim == 0:
        return None
    return 0


def _tile_beams(tree: Any, beams: int) -> Any:
    """Every row b of the batch -> rows b·W .. b·W + W - 1."""

    def one(path: tuple, x: jax.Array) -> jax.Array:
        axis = _batch_axis(path, x)
        return x if axis is None else jnp.repeat(x, beams, axis=axis)

    return jax.tree_util.tree_map_with_path(one, tree)


def _gather_rows(tree: Any, rows: jax.Array) -> Any:
    """Reorders the batch rows of every leaf (cross-attention caches are the same for all beams
    of an example and stay where they are)."""

    def one(path: tuple, x: jax.Array) -> jax.Array:
        axis = _batch_axis(path, x)
        name = getattr(path[-1], "key", None) if path else None
        if axis is None or name in _CROSS_LEAVES:
            return x
        return jnp.take(x, rows, axis=axis)

    return jax.tree_util.tree_map_with_path(one, tree)


def beam_search_loop(
    step_fn: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
    state: Any,
    logits: jax.Array,
    *,
    beam_size: int,
    max_new_tokens: int,
    eos_id: int | None,
    length_penalty_alpha: float = 0.6,
    pad_id: int = 0,
    length_penalty_form: str = "gnmt",
    early_stopping: bool | str | None = None,
    constraints: Constraints = NO_CONSTRAINTS,
    prefix: jax.Array | None = None,
    prefix_mask: jax.Array | None = None,
    source: jax.Array | None = None,
) -> BeamOutput:
    """Beam search over up to max_new_tokens tokens (prefix [B, P]: the tokens before them,
    which no_repeat_ngram_size and repetition_penalty also look at; prefix_mask [B, P] its
    real tokens, the penalty skipping leading pads; source [B, S] the tokens
    encoder_repetition_penalty rewards).

    logits [B, V] predict the first token given `state` (batch B); step_fn(state, tokens [B·W])
    -> (logits [B·W, V], state) advances beams (the state is tiled to B·W rows here and its rows
    follow their beams). Each step extends every live beam by every token and ranks the 2W best
    candidates; those among the first W that end in EOS join the finished set (score =
    log-probability / length_penalty(tokens incl. EOS)) and the W best that do not end stay
    alive. With beam_size 1 this is exactly greedy decoding up to the first EOS. A row stops early once
    it has W finished hypotheses and no live beam could still beat the worst of them (its
    log-probability can only fall). Rows with fewer than W finished hypotheses after
    max_new_tokens fill the rest with live beams (scored at their length), ranked after the
    finished ones.

    length_penalty_form: 'gnmt' or 'hf' (see `length_penalty`). early_stopping: None is the
    rule above (stop only when no live beam can win); True, False or 'never' follow Hugging
    Face transformers' `generate(num_beams=..., early_stopping=...)` exactly: True stops once
    every row has W finished hypotheses (a full row takes no more); True and False stop a row
    once the best live beam, scored at its current length, cannot beat the worst finished one;
    'never' once it cannot at any length up to max_new_tokens (the same bound as None). A row that stops takes no more hypotheses, and at
    max_new_tokens the W best candidates of the last step finish (and count as finished).
    `constraints` (forced and banned tokens) apply to the log-probabilities before the beams'
    scores are added, as transformers applies its logits processors.
    """
    B, V = logits.shape
    W, N = beam_size, max_new_tokens
    if early_stopping not in EARLY_STOPPING:
        raise ValueError(f"early_stopping must be one of {EARLY_STOPPING}, got {early_stopping!r}")
    hf_rules = early_stopping is not None
    form = length_penalty_form
    if W < 1:
        raise ValueError(f"beam_size must be >= 1, got {W}")
    if V < 2:
        raise ValueError(f"beam search needs a vocabulary of at least 2 tokens, got {V}")
    alpha = length_penalty_alpha
    state = _tile_beams(state, W)
    logits = jnp.repeat(logits, W, axis=0)
    # Only beam 0 starts alive, so the first step's candidates are all distinct.
    alive_logp = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (W - 1), jnp.float32), (B, 1))
    alive_seq = jnp.full((B, W, N), pad_id, jnp.int32)
    fin_seq = jnp.full((B, W, N), pad_id, jnp.int32)
    fin_score = jnp.full((B, W), NEG_INF, jnp.float32)
    fin_flag = jnp.zeros((B, W), bool)
    steps = jnp.arange(N)

    def row_done(i: jax.Array, alive_logp: jax.Array, fin_score: jax.Array, fin_flag: jax.Array):
        # The best score a live beam could still reach: its log-probability (which only falls)
        # over the largest length penalty ahead (alpha >= 0: at N tokens; alpha < 0: at i + 1).
        # (transformers, unless early_stopping='never', scores it at its current length i + 1.)
        now = length_penalty(i + 1, alpha, form)
        if early_stopping in (True, False):
            best_lp = now
        else:
            best_lp = jnp.maximum(now, length_penalty(N, alpha, form))
        bound = alive_logp[:, 0] / best_lp
        worst = jnp.min(jnp.where(fin_flag, fin_score, NEG_INF), axis=1)
        return jnp.all(fin_flag, axis=1) & (worst >= bound)

    # The tokens before the new ones, per beam (the n-gram check and the penalty read them too).
    before = jnp.zeros((B * W, 0), jnp.int32)
    if prefix is not None:
        before = jnp.repeat(prefix.astype(jnp.int32), W, axis=0)
    pads = jnp.repeat(leading_pads(prefix_mask, B), W, axis=0)
    in_source = _source_tokens(source, constraints, V)
    if in_source is not None:
        in_source = jnp.repeat(in_source, W, axis=0)

    def cond(carry: tuple) -> jax.Array:
        i, _, _, alive_logp, _, _, fin_score, fin_flag, stopped = carry
        if hf_rules:
            go = (i < N) & ~jnp.all(stopped)
            return go & ~jnp.all(fin_flag) if early_stopping is True else go
        if eos_id is None:
            return i < N
        return (i < N) & ~jnp.all(row_done(i, alive_logp, fin_score, fin_flag))

    def body(carry: tuple) -> tuple:
        i, state, logits, alive_logp, alive_seq, fin_seq, fin_score, fin_flag, stopped = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        history = None  # the sequence so far: only the n-gram check and the penalty read it
        if constraints.needs_history:
            history = jnp.concatenate([before, alive_seq.reshape(B * W, N)], axis=1)
        logp = constrain_scores(
            logp, i, N, constraints, eos_id=eos_id, history=history,
            length=before.shape[1] + i, start=pads, in_source=in_source,
        ).reshape(B, W, V)  # fmt: skip
        candidates = (alive_logp[:, :, None] + logp).reshape(B, W * V)
        top_logp, top_index = jax.lax.top_k(candidates, 2 * W)  # [B, 2W]
        beam, token = top_index // V, (top_index % V).astype(jnp.int32)
        seq = jnp.take_along_axis(alive_seq, beam[:, :, None], axis=1)
        seq = jnp.where(steps == i, token[:, :, None], seq)  # [B, 2W, N]
        is_eos = token == eos_id if eos_id is not None else jnp.zeros_like(token, dtype=bool)
        # An EOS among the W best candidates finishes a hypothesis (lower-ranked ones are
        # dropped, as in Hugging Face's beam search, so that one beam is exactly greedy); a dead
        # beam's EOS never does.
        ended = is_eos & (jnp.arange(2 * W) < W) & (top_logp > NEG_INF / 2)
        if hf_rules:
            # transformers: at max_new_tokens every one of the W best candidates finishes, and
            # a row that has stopped (or is full, with early_stopping=True) takes no more.
            last = (i == N - 1) & (jnp.arange(2 * W) < W) & (top_logp > NEG_INF / 2)
            closed = stopped
            if early_stopping is True:
                closed = closed | jnp.all(fin_flag, axis=1)
            ended = (ended | last) & ~closed[:, None]
        # Live: the W best candidates that do not end in EOS.
        alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), W)
        alive_seq = jnp.take_along_axis(seq, keep[:, :, None], axis=1)
        source_beam = jnp.take_along_axis(beam, keep, axis=1)
        tokens = jnp.take_along_axis(token, keep, axis=1)
        # Finished: the W best of the old ones and those that ended now.
        new_score = jnp.where(ended, top_logp / length_penalty(i + 1, alpha, form), NEG_INF)
        fin_score, pick = jax.lax.top_k(jnp.concatenate([fin_score, new_score], axis=1), W)
        fin_seq = jnp.take_along_axis(
            jnp.concatenate([fin_seq, seq], axis=1), pick[:, :, None], axis=1
        )
        fin_flag = jnp.take_along_axis(jnp.concatenate([fin_flag, ended], axis=1), pick, axis=1)
        rows = (jnp.arange(B)[:, None] * W + source_beam).reshape(B * W)
        if hf_rules:
            stopped = stopped | row_done(i, alive_logp, fin_score, fin_flag)
        logits, state = step_fn(_gather_rows(state, rows), tokens.reshape(B * W))
        return i + 1, state, logits, alive_logp, alive_seq, fin_seq, fin_score, fin_flag, stopped

    init = (jnp.zeros((), jnp.int32), state, logits, alive_logp, alive_seq, fin_seq)
    init = (*init, fin_score, fin_flag, jnp.zeros((B,), bool))
    i, _, _, alive_logp, alive_seq, fin_seq, fin_score, fin_flag, _ = jax.lax.while_loop(
        cond, body, init
    )
    # Finished hypotheses first (by score), then live beams scored at their length.
    alive_score = alive_logp / length_penalty(i, alpha, form)
    seqs = jnp.concatenate([fin_seq, alive_seq], axis=1)
    scores = jnp.concatenate([jnp.where(fin_flag, fin_score, NEG_INF), alive_score], axis=1)
    flags = jnp.concatenate([fin_flag, jnp.zeros_like(fin_flag)], axis=1)
    order = jnp.lexsort((-scores, ~flags), axis=-1)[:, :W]
    return BeamOutput(
        sequences=jnp.take_along_axis(seqs, order[:, :, None], axis=1),
        scores=jnp.take_along_axis(scores, order, axis=1),
        finished=jnp.take_along_axis(flags, order, axis=1),
        steps=i,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "beam_size",
        "max_new_tokens",
        "eos_id",
        "length_penalty",
        "pad_id",
        "length_penalty_form",
        "early_stopping",
        "constraints",
    ),
)
def beam_search(
    model: nn.Module,
    params: Any,
    prompt: jax.Array,
    *,
    beam_size: int,
    max_new_tokens: int,
    eos_id: int | None,
    length_penalty: float = 0.6,
    prompt_mask: jax.Array | None = None,
    pad_id: int = 0,
    encoder_inputs: jax.Array | None = None,
    encoder_mask: jax.Array | None = None,
    length_penalty_form: str = "gnmt",
    early_stopping: bool | str | None = None,
    constraints: Constraints = NO_CONSTRAINTS,
) -> BeamOutput:
    """Beam search from prompt [B, P] (as in `generate`) -> BeamOutput with [B, beam_size, N]
    new tokens; `.sequences[:, 0]` is the highest-scoring finished hypothesis of each row.

    length_penalty is the alpha of `length_penalty_form` ('gnmt', or 'hf': tokens^alpha; 0 =
    raw log-probability). Stops early at EOS (see `beam_search_loop`). With
    length_penalty_form='hf' and early_stopping True / False / 'never' the search is Hugging
    Face transformers' `generate(num_beams=W, length_penalty=alpha, early_stopping=...)`.
    """
    logits, state = prefill(
        model,
        params,
        prompt,
        max_new_tokens=max_new_tokens,
        prompt_mask=prompt_mask,
        encoder_inputs=encoder_inputs,
        encoder_mask=encoder_mask,
    )
    return beam_search_loop(
        functools.partial(decode_step, model, params),
        state,
        logits[:, -1],
        beam_size=beam_size,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        length_penalty_alpha=length_penalty,
        pad_id=pad_id,
        length_penalty_form=length_penalty_form,
        early_stopping=early_stopping,
        constraints=constraints,
        prefix=prompt,
        prefix_mask=prompt_mask,
        source=prompt if encoder_inputs is None else encoder_inputs,
    )


# ---------------------------------------------------------------------------------------------
# As a config says


def generate_tokens(
    settings: Any,
    model: nn.Module,
    params: Any,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    eos_id: int | None,
    pad_id: int = 0,
    prompt_mask: jax.Array | None = None,
    encoder_inputs: jax.Array | None = None,
    encoder_mask: jax.Array | None = None,
) -> jax.Array:
    """New tokens [B, max_new_tokens] chosen as `settings` (an lmflax.config.GenerateConfig)
    says: beam search when beam_size > 1 (the best hypothesis), else sampling; with the
    forced and banned tokens it names (forced_bos_id / forced_eos_id, -1 = none; banned_ids)."""
    constraints = constraints_of(settings)
    common = dict(
        constraints=constraints,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        pad_id=pad_id,
        prompt_mask=prompt_mask,
        encoder_inputs=encoder_inputs,
        encoder_mask=encoder_mask,
    )
    if settings.beam_size > 1:
        out = beam_search(
            model,
            params,
            prompt,
            beam_size=settings.beam_size,
            length_penalty=settings.length_penalty,
            length_penalty_form=getattr(settings, "length_penalty_form", "gnmt"),
            early_stopping=EARLY_STOPPING_NAMES[getattr(settings, "early_stopping", "exact")],
            **common,
        )
        return out.sequences[:, 0]
    out = generate(
        model,
        params,
        prompt,
        rng=rng,
        temperature=settings.temperature,
        top_k=settings.top_k or None,
        top_p=settings.top_p if settings.top_p < 1.0 else None,
        **common,
    )
    return out[:, prompt.shape[1] :]


def constraints_of(settings: Any) -> Constraints:
    """The `Constraints` a GenerateConfig names (forced ids < 0 = none)."""
    bos = getattr(settings, "forced_bos_id", -1)
    eos = getattr(settings, "forced_eos_id", -1)
    return Constraints(
        forced_bos_id=bos if bos >= 0 else None,
        forced_eos_id=eos if eos >= 0 else None,
        banned_ids=tuple(int(t) for t in getattr(settings, "banned_ids", ())),
        min_new_tokens=int(getattr(settings, "min_new_tokens", 0)),
        no_repeat_ngram_size=int(getattr(settings, "no_repeat_ngram_size", 0)),
        repetition_penalty=float(getattr(settings, "repetition_penalty", 1.0)),
        encoder_repetition_penalty=float(getattr(settings, "encoder_repetition_penalty", 1.0)),
    )


def until_eos(tokens: Sequence[int] | np.ndarray, eos_id: int | None) -> list[int]:
    """The tokens before the first eos_id."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t == eos_id:
            break
        out.append(int(t))
    return out
