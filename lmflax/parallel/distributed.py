"""Joining a multi-process JAX cluster (`jax.distributed`): TPU pod slices, SLURM, or by hand.

Every process of a multi-host run executes the same program; `initialize` must run before
anything touches a JAX backend. Afterwards `jax.devices()` lists the devices of all processes,
`jax.local_devices()` this process's, and `jax.process_index()` says who we are.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


def detect_cluster(environ: dict[str, str] | None = None) -> str | None:
    """The kind of multi-process launch we are in, or None for a single process.

    'slurm': `srun` with more than one task (SLURM_NTASKS > 1; jax reads the coordinator, process
    count and id from SLURM_* variables). 'tpu': a Cloud TPU VM (TPU chips under /dev and libtpu
    installed; jax asks the TPU metadata for the slice's workers, and a single-host VM simply
    forms a cluster of one) or a GKE TPU pod (TPU_WORKER_HOSTNAMES lists the hosts).
    """
    env = os.environ if environ is None else environ
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if all(v in env for v in slurm_vars):
        try:
            if int(env["SLURM_NTASKS"]) > 1:
                return "slurm"
        except ValueError:
            pass
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", ""):
        return "tpu"
    if environ is None and _on_cloud_tpu_vm():
        return "tpu"
    return None


def _on_cloud_tpu_vm() -> bool:
    chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    mode: str = "auto",
) -> dict[str, Any]:
    """Joins the cluster this process belongs to; returns what was done.

    Explicit arguments (all three, e.g. 'host0:1234', 2, 0) start or join that cluster. Without
    them, mode 'auto' joins a detected SLURM or Cloud TPU cluster and otherwise stays a single
    process; 'on' always calls `jax.distributed.initialize()` (letting jax detect the cluster,
    e.g. Open MPI or Kubernetes); 'off' never joins one.

    On CPU, cross-process collectives go over gloo. Must run before any JAX computation.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r}; accepted: {', '.join(MODES)}")
    explicit = (coordinator_address, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id go together; got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}"
            )
        if mode == "off":
            raise ValueError("--distributed=off contradicts an explicit --coordinator_address")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id must be in [0, --num_processes), got process_id={process_id} "
                f"with num_processes={num_processes}"
            )
        if ":" not in coordinator_address:
            raise ValueError(
                f"--coordinator_address must be HOST:PORT (process 0's host), got "
                f"{coordinator_address!r}"
            )
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        how = "explicit"
    else:
        kind = detect_cluster() if mode == "auto" else None
        if mode == "off" or (mode == "auto" and kind is None):
            return {"initialized": False, "process_index": 0, "process_count": 1}
        how = f"auto-detected {kind}" if kind else "jax's cluster detection"
        _cpu_collectives()
        jax.distributed.initialize()
    info = {
        "initialized": True,
        "how": how,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
    }
    log.log(
        logging.INFO if info["process_index"] == 0 else logging.DEBUG,
        "joined a %d-process cluster (%s) as process %d; %d devices in all, %d local",
        info["process_count"],
        how,
        info["process_index"],
        jax.device_count(),
        jax.local_device_count(),
    )
    return info


def _cpu_collectives() -> None:
    # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib (it is the
    # default in recent jax, set explicitly so an older default of "none" cannot deadlock).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_coordinator() -> bool:
    """True in process 0, the one that writes logs, metrics and summaries."""
    return jax.process_index() == 0


def from_coordinator(compute: Callable[[], Any]) -> Any:
    """`compute()` run on process 0 only, its (JSON-able) result given to every process.

    For values that cost I/O and must agree across hosts (a base checkpoint's checksums): the
    other processes neither read nor compute, and none can disagree with process 0's answer.
    All processes must call it at the same point (it is a collective).
    """
    if jax.process_count() == 1:
        return compute()
    data = json.dumps(compute()).encode() if is_coordinator() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros(size, np.uint8)
    if is_coordinator():
        buf[:] = np.frombuffer(data, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(buf.tobytes().decode())
