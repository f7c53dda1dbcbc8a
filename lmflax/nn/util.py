"""Small helpers shared by the layers: dtypes, logically-partitioned parameters, constraints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DType = Any
Initializer = Callable[..., jax.Array]

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}


def as_dtype(dtype: DType) -> DType:
    """Accepts a jnp dtype or one of the names 'float32', 'bfloat16', 'float16', 'float64'."""
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {sorted(_DTYPES)}") from None
    return dtype


def logical_param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    param_dtype: DType,
) -> jax.Array:
    """Creates `module.<name>` with logical axis names `axes` (one per dimension of `shape`)."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name}: {len(axes)} axis names {axes} for shape {shape}")
    return module.param(
        name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), as_dtype(param_dtype)
    )


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside a mesh."""
    return nn.with_logical_constraint(x, tuple(axes))


def unbox(tree: Any) -> Any:
    """Plain arrays from a tree of `nn.Partitioned` boxes (what `init` returns), without adding
    sharding constraints (safe under a mesh). Leaves that are not boxed pass through."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )
