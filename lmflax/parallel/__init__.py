"""Device meshes, logical-axis rules and sharded arrays (`mesh.py`), and joining a multi-host
cluster (`distributed.py`)."""

from lmflax.parallel.mesh import (
    AXES,
    batch_sharding,
    logical_shardings,
    make_mesh,
    resolve_mesh_shape,
    unbox,
    validate_devices,
)

__all__ = [
    "AXES",
    "batch_sharding",
    "logical_shardings",
    "make_mesh",
    "resolve_mesh_shape",
    "unbox",
    "validate_devices",
]
