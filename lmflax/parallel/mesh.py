"""Device meshes and the mapping from logical axis names to shardings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmflax.config import Config, ConfigError, MeshConfig
from lmflax.nn.util import unbox

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Mesh sizes with the -1 axis filled in; ConfigError if they cannot tile the devices."""
    sizes = mesh.sizes()
    known = 1
    for s in sizes.values():
        if s != -1:
            known *= s
    if -1 in sizes.values():
        if num_devices % known:
            raise ConfigError(
                f"mesh sizes {sizes}: the fixed axes' product {known} does not divide the "
                f"{num_devices} devices"
            )
        sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    elif known != num_devices:
        raise ConfigError(
            f"mesh data×fsdp×tensor = {sizes['data']}×{sizes['fsdp']}×{sizes['tensor']} = {known} "
            f"but there are {num_devices} devices; make the product {num_devices} or set one axis to -1"
        )
    return sizes


def validate_devices(cfg: Config, num_devices: int) -> dict[str, int]:
    """Device-count checks (mesh tiling, batch divisibility); returns the resolved mesh sizes."""
    sizes = resolve_mesh_shape(cfg.mesh, num_devices)
    dp = sizes["data"] * sizes["fsdp"]
    micro = cfg.data.batch_size // cfg.optimizer.grad_accum_steps
    if micro % dp:
        raise ConfigError(
            f"the global batch (data.batch_size={cfg.data.batch_size}"
            + (
                f" / grad_accum_steps={cfg.optimizer.grad_accum_steps} = {micro}"
                if cfg.optimizer.grad_accum_steps > 1
                else ""
            )
            + f") must be divisible by the data-parallel size data×fsdp = {dp}"
        )
    return sizes


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), sizes from the config.

    On real hardware `jax.experimental.mesh_utils` orders devices so that the innermost axes
    (tensor, then fsdp) sit on the fastest links.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
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
