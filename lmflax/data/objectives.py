"""Training objectives on the data side: causal LM targets and BERT's 80/10/10 masking.

Pure NumPy functions of one packed example (and a NumPy Generator for the random ones), so the
pipeline stays deterministic and resumable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def causal_document(ids: Sequence[int], eos_id: int) -> dict[str, np.ndarray]:
    """One document for next-token prediction, GPT-2 style: <eos> starts it and ends it.

    ids [n] -> inputs = [eos, *ids], targets = [*ids, eos], both [n + 1] int32.
    """
    ids = np.asarray(ids, dtype=np.int32)
    eos = np.array([eos_id], dtype=np.int32)
    return {"inputs": np.concatenate([eos, ids]), "targets": np.concatenate([ids, eos])}


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    probability: float = 0.15,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> dict[str, np.ndarray]:
    """BERT masking. tokens [L] -> inputs [L] (corrupted), targets [L] (= tokens), weights [L].

    Each non-special token is chosen with `probability`; a chosen token becomes [MASK] with
    mask_prob, a uniformly random token with random_prob, and stays itself otherwise. weights is
    1.0 exactly at the chosen positions (the loss is computed there only).
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    candidates = ~np.isin(tokens, np.asarray(special_ids, dtype=np.int32))
    chosen = (rng.random(tokens.shape) < probability) & candidates
    action = rng.random(tokens.shape)
    random_tokens = rng.integers(0, vocab_size, size=tokens.shape, dtype=np.int32)
    inputs = np.where(chosen & (action < mask_prob), mask_id, tokens)
    use_random = chosen & (action >= mask_prob) & (action < mask_prob + random_prob)
    inputs = np.where(use_random, random_tokens, inputs).astype(np.int32)
    return {"inputs": inputs, "targets": tokens, "weights": chosen.astype(np.float32)}
