"""Device meshes and the mapping from logical axis names to shardings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmflax.config import MeshConfig, resolve_mesh_shape
from lmflax.nn._util import unbox

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), sizes from the config.

    On real hardware `jax.experimental.mesh_utils` orders devices so that the innermost axes
    (tensor, then fsdp) sit on the fastest links.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def _spec_for(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (e.g. 1 KV head over tensor=2)."""
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[n] for n in names]))
        if shape[i] % size:
            log.info(
                "%s: dim %d (size %d) not divisible by %s=%d; replicated",
                what,
                i,
                shape[i],
                axes,
                size,
            )
            out.append(None)
        else:
            out.append(axes)
    return PartitionSpec(*out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes (from eval_shape of an
    init), following the logical rules. Unboxed leaves are replicated."""
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, list(rules))
    shapes = unbox(abstract_boxed)

    def one(path: Any, shape: Any, spec: Any) -> NamedSharding:
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        return NamedSharding(mesh, _spec_for(shape.shape, spec, mesh, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(
        one, shapes, mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> NamedSharding:
    """Sharding of a batch: its leading axis over the mesh axes that 'batch' maps to."""
    axes = nn.logical_to_mesh_axes(("batch",), list(rules))
    return NamedSharding(mesh, PartitionSpec(*axes))
