"""Device meshes, logical-axis rules and sharded arrays."""

from lmflax.parallel.mesh import AXES, batch_sharding, logical_shardings, make_mesh, unbox

__all__ = ["AXES", "batch_sharding", "logical_shardings", "make_mesh", "unbox"]
