"""LoRA as a parameter transform: the model is never changed.

The train state holds two trees: `frozen` (the base model's parameters, stored as
model.param_dtype, bfloat16, or int8 kernels with per-output-channel scales) and the trainable
adapters (`{module path: {'lora_a': A, 'lora_b': B}}` for every Dense kernel whose path matches
model.lora.targets). Inside the loss, `merge` rebuilds the model's parameter tree,

    kernel = dequant(frozen kernel) + (alpha / rank) · A·B        A [*lead, *in, r], B [*lead, r, *out]

so any model (GPT, BERT, encoder-decoders, Llama-family) trains unchanged, gradients reach only
the adapters, and the optimizer's state exists for the adapters alone.

A Dense kernel is a parameter named 'kernel' (`lmflax.nn.Linear` / `LinearParams`): logical axes
[*lead, *in, *out] where `lead` is the stacked-layer axis ('layers') of scanned stacks, `in` is
the first axis, or the first two when they are ('heads' | 'kv_heads', 'kv') — an attention output
projection's [N, H] input — and `out` the rest. Adapters take their base kernel's logical names
(A: *lead, *in, then an unsharded rank axis; B: *lead, rank, *out), so they shard like it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmflax.config import ConfigError
from lmflax.models.config import LoraConfig
from lmflax.nn.util import as_dtype

Path_ = tuple[str, ...]

KERNEL = "kernel"
INT8 = "kernel_int8"  # int8 storage of a frozen kernel ...
SCALE = "kernel_scale"  # ... and its float32 per-output-channel scales [*lead, *out]
A, B = "lora_a", "lora_b"
_LAYER_AXES = ("layers",)
_TWO_INPUT_AXES = {("heads", "kv"), ("kv_heads", "kv")}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One Dense kernel of the base model: where it is, its shape and logical axis names, how
    its axes split into stacked-layer, input and output axes, and whether it gets an adapter."""

    path: Path_  # the module's path; the kernel is path + ('kernel',)
    shape: tuple[int, ...]
    names: tuple[str | None, ...]
    lead: int
    n_in: int
    adapted: bool

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return self.shape[: self.lead]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[self.lead : self.lead + self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.lead + self.n_in :]

    @property
    def name(self) -> str:
        return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class LoraPlan:
    """Which kernels get adapters, and how the frozen base is stored (static: built once from
    the abstract parameter tree)."""

    config: LoraConfig
    kernels: tuple[KernelSpec, ...]
    param_dtype: str  # the dtype `merge` returns the model's parameters in

    @property
    def adapted(self) -> tuple[KernelSpec, ...]:
        return tuple(k for k in self.kernels if k.adapted)

    def spec(self, path: Path_) -> KernelSpec | None:
        return self._by_path().get(path)

    def _by_path(self) -> dict[Path_, KernelSpec]:
        cache = self.__dict__.get("_cache")
        if cache is None:
            cache = {k.path: k for k in self.kernels}
            object.__setattr__(self, "_cache", cache)
        return cache


# ---------------------------------------------------------------------------------------------
# Trees


def flatten(tree: Mapping[str, Any], prefix: Path_ = ()) -> dict[Path_, Any]:
    """{path tuple: leaf} of a nested dict (boxed leaves stay leaves)."""
    out: dict[Path_, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def unflatten(flat: Mapping[Path_, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _value(x: Any) -> Any:
    return x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x


def _names(x: Any) -> tuple[str | None, ...] | None:
    return tuple(x.names) if isinstance(x, nn.Partitioned) else None


def _box(like: Any, value: Any, names: tuple[str | None, ...] | None = None) -> Any:
    """`value` boxed like `like` (with `names` if given); plain when `like` is plain."""
    if not isinstance(like, nn.Partitioned):
        return value
    return like.replace(value=value, names=tuple(names) if names is not None else like.names)


# ---------------------------------------------------------------------------------------------
# The plan


def _split(names: tuple[str | None, ...]) -> tuple[int, int]:
    lead = 0
    while lead < len(names) and names[lead] in _LAYER_AXES:
        lead += 1
    n_in = 2 if tuple(names[lead : lead + 2]) in _TWO_INPUT_AXES else 1
    return lead, n_in


def make_plan(boxed_params: Any, config: LoraConfig, param_dtype: str = "float32") -> LoraPlan:
    """The plan for a model's (boxed, possibly abstract) parameter tree: every Dense kernel, and
    which of them `config.targets` matches. ConfigError when a pattern matches no kernel (the
    message lists the kernels there are)."""
    kernels = []
    patterns = [re.compile(p) for p in config.targets]
    hits = [0] * len(patterns)
    for path, leaf in flatten(boxed_params).items():
        if path[-1] != KERNEL:
            continue
        shape = tuple(_value(leaf).shape)
        names = _names(leaf) or (None,) * len(shape)
        lead, n_in = _split(names)
        if len(shape) < lead + n_in + 1:
            continue
        module = path[:-1]
        name = "/".join(module)
        matched = [bool(p.search(name)) for p in patterns]
        hits = [h + m for h, m in zip(hits, matched)]
        kernels.append(KernelSpec(module, shape, names, lead, n_in, any(matched)))
    unmatched = [p for p, h in zip(config.targets, hits) if not h]
    if unmatched:
        listing = ", ".join(k.name for k in kernels[:12]) + (" ..." if len(kernels) > 12 else "")
        raise ConfigError(
            f"model.lora.targets {unmatched} match no Dense kernel of this model; its kernels "
            f"are: {listing}"
        )
    return LoraPlan(config, tuple(kernels), param_dtype)


# ---------------------------------------------------------------------------------------------
# Building the state


def adapter_shapes(spec: KernelSpec, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A's shape [*lead, *in, r], B's shape [*lead, r, *out])."""
    return (*spec.lead_shape, *spec.in_shape, rank), (*spec.lead_shape, rank, *spec.out_shape)


def init_adapters(plan: LoraPlan, rng: jax.Array) -> dict[str, Any]:
    """Fresh adapters, boxed with logical names: A ~ U(±1/sqrt(fan_in)) (PEFT's default), B = 0,
    so the merged model starts equal to the base."""
    r = plan.config.rank
    dtype = as_dtype(plan.param_dtype)
    flat = {}
    for i, spec in enumerate(plan.adapted):
        a_shape, b_shape = adapter_shapes(spec, r)
        bound = 1.0 / math.sqrt(math.prod(spec.in_shape))
        a = jax.random.uniform(jax.random.fold_in(rng, i), a_shape, dtype, -bound, bound)
        b = jnp.zeros(b_shape, dtype)
        lead, ins, outs = (
            spec.names[: spec.lead],
            spec.names[spec.lead : spec.lead + spec.n_in],
            spec.names[spec.lead + spec.n_in :],
        )
        flat[(*spec.path, A)] = nn.LogicallyPartitioned(a, (*lead, *ins, None))
        flat[(*spec.path, B)] = nn.LogicallyPartitioned(b, (*lead, None, *outs))
    return unflatten(flat)


def quantize_int8(w: jax.Array, spec: KernelSpec) -> tuple[jax.Array, jax.Array]:
    """Weight-only int8 of a kernel [*lead, *in, *out]: per output channel (and layer), the
    largest |w| maps to 127. Returns (q int8 [same shape], scale float32 [*lead, *out])."""
    w = w.astype(jnp.float32)
    axes = tuple(range(spec.lead, spec.lead + spec.n_in))
    amax = jnp.max(jnp.abs(w), axis=axes)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, axes)), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array, spec: KernelSpec, dtype: Any) -> jax.Array:
    axes = tuple(range(spec.lead, spec.lead + spec.n_in))
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axes)).astype(dtype)


def freeze(plan: LoraPlan, params: Any) -> dict[str, Any]:
    """The base model's parameters (boxed or plain) in their frozen storage (boxes kept)."""
    mode = plan.config.base_dtype
    out = {}
    for path, leaf in flatten(params).items():
        value = _value(leaf)
        spec = plan.spec(path[:-1]) if path[-1] == KERNEL else None
        if mode == "int8" and spec is not None:
            q, scale = quantize_int8(value, spec)
            out[(*path[:-1], INT8)] = _box(leaf, q)
            scale_names = (*spec.names[: spec.lead], *spec.names[spec.lead + spec.n_in :])
            out[(*path[:-1], SCALE)] = _box(leaf, scale, scale_names)
        elif mode in ("bfloat16", "int8") and jnp.issubdtype(value.dtype, jnp.floating):
            out[path] = _box(leaf, value.astype(jnp.bfloat16))
        else:
            out[path] = leaf
    return unflatten(out)


# ---------------------------------------------------------------------------------------------
# The transform


def delta(spec: KernelSpec, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale · A·B in the kernel's shape [*lead, *in, *out] (float32, full precision)."""
    lead = spec.lead_shape
    i, o, r = math.prod(spec.in_shape), math.prod(spec.out_shape), a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(*lead, i, r)
    b2 = b.astype(jnp.float32).reshape(*lead, r, o)
    ab = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    return (scale * ab).reshape(spec.shape)


def merge(
    plan: LoraPlan,
    frozen: Any,
    adapters: Any,
    rng: jax.Array | None = None,
    deterministic: bool = True,
) -> dict[str, Any]:
    """The model's parameter tree (plain arrays, model.param_dtype): dequantised frozen weights,
    and W + (alpha/r)·A·B for every adapted kernel. With `rng` and not `deterministic`,
    model.lora.dropout drops input features of each adapter (rows of A, rescaled by 1/keep)."""
    dtype = as_dtype(plan.param_dtype)
    cfg = plan.config
    flat_frozen = flatten(frozen)
    flat_adapters = flatten(adapters)
    out: dict[Path_, Any] = {}
    for path, value in flat_frozen.items():
        if path[-1] == SCALE:
            continue
        if path[-1] == INT8:
            spec = plan.spec(path[:-1])
            w = dequantize_int8(value, flat_frozen[(*path[:-1], SCALE)], spec, jnp.float32)
            path = (*path[:-1], KERNEL)
        else:
            w = value
        out[path] = w
    for i, spec in enumerate(plan.adapted):
        key = (*spec.path, KERNEL)
        a, b = flat_adapters[(*spec.path, A)], flat_adapters[(*spec.path, B)]
        if cfg.dropout > 0 and rng is not None and not deterministic:
            keep = 1.0 - cfg.dropout
            mask = jax.random.bernoulli(jax.random.fold_in(rng, i), keep, a.shape[:-1])
            a = a * (mask[..., None].astype(a.dtype) / keep)
        out[key] = out[key].astype(jnp.float32) + delta(spec, a, b, cfg.scale)
    return unflatten(
        {p: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for p, v in out.items()}
    )


def count(tree: Any) -> int:
    """The number of values in a tree of arrays (or ShapeDtypeStructs)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
