"""Positional encodings: the sinusoidal table, learned absolute positions, rotary (RoPE)."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmflax.nn.util import DType, as_dtype, logical_param


def sinusoidal_positions(length: int, dim: int) -> jax.Array:
    """The Transformer paper's table, [length, dim] float32.

    PE[p, 2i] = sin(p / 10000^(2i/dim)) and PE[p, 2i+1] = cos(p / 10000^(2i/dim)): sines and
    cosines interleave along the feature axis.
    """
    if length < 0 or dim <= 0:
        raise ValueError(f"sinusoidal_positions needs length >= 0 and dim > 0, got {length}, {dim}")
    pos = np.arange(length, dtype=np.float64)[:, None]
    two_i = np.arange(0, dim, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, two_i / dim)
    table = np.zeros((length, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : dim // 2])
    return jnp.asarray(table, dtype=jnp.float32)


class LearnedPositions(nn.Module):
    """A learned [max_len, D] table indexed by position. positions [B, T] or [T] -> [B|1, T, D]."""

    max_len: int
    features: int
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        table = logical_param(
            self,
            "embedding",
            nn.initializers.normal(self.init_std),
            (self.max_len, self.features),
            ("positions", "embed"),
            self.param_dtype,
        )
        out = jnp.take(table, positions, axis=0).astype(as_dtype(self.dtype))
        return out if out.ndim == 3 else out[None]


ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are rescaled for longer contexts (Hugging Face's `rope_type`).

    kind: 'none' (base^(-2i/R)), 'linear' (every frequency / factor: position interpolation) or
    'llama3' (Llama 3.1: frequencies whose wavelength exceeds original_max_len / low_freq_factor
    are divided by factor, those below original_max_len / high_freq_factor are kept, and the
    band between is interpolated smoothly).
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def problems(self, prefix: str = "rope_scaling") -> list[str]:
        """What is wrong with these settings (empty = nothing)."""
        errs = []
        if self.kind not in ROPE_SCALINGS:
            errs.append(f"{prefix}={self.kind!r} is not supported; accepted: {ROPE_SCALINGS}")
        if not self.factor > 0:
            errs.append(f"{prefix}_factor must be > 0, got {self.factor}")
        if self.kind == "llama3":
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                errs.append(
                    f"{prefix} 'llama3' needs 0 < low_freq_factor < high_freq_factor, got "
                    f"{self.low_freq_factor} and {self.high_freq_factor}"
                )
            if self.original_max_len <= 0:
                errs.append(
                    f"{prefix} 'llama3' needs original_max_len > 0, got {self.original_max_len}"
                )
        return errs


def rope_frequencies(
    rotated: int, base: float = 10000.0, scaling: RopeScaling | None = None
) -> jax.Array:
    """The inverse frequencies [rotated / 2] float32 of RoPE on `rotated` features, rescaled
    as `scaling` says."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotated, 2, dtype=jnp.float32) / rotated))
    if scaling is None or scaling.kind == "none":
        return inv_freq
    for problem in scaling.problems():
        raise ValueError(problem)
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3
    old = float(scaling.original_max_len)
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    base: float = 10000.0,
    fraction: float = 1.0,
    scaling: RopeScaling | None = None,
) -> jax.Array:
    """Rotates pairs of features of x [B, T, N, H] by angles positions [B, T] · base^(-2i/R).

    R = fraction · H features are rotated (the rest pass through). Pairs are (i, i + R/2), the
    "rotate half" layout of GPT-NeoX and Llama. `scaling` rescales the frequencies
    (`rope_frequencies`). Computed in float32, returned in x's dtype.
    """
    H = x.shape[-1]
    R = int(H * fraction)
    if R % 2 or R == 0:
        raise ValueError(f"RoPE needs an even number of rotated features, got {R} of head_dim {H}")
    inv_freq = rope_frequencies(R, base, scaling)
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    sin = jnp.sin(angle)[:, :, None, :]
    cos = jnp.cos(angle)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., : R // 2], x32[..., R // 2 : R], x32[..., R:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)
