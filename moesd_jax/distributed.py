"""Multi-process (multi-host) helpers: one script runs the same on one process or many.

Every process runs the same program (JAX's multi-controller model): each builds the same
model and inputs, :class:`~moesd_jax.sharding.ShardingPlan` places its own shards of
every global array (``put_global``), jitted programs run collectively, and results come
back to every process with :func:`to_host` (a ``process_allgather`` where a process does
not hold all of an array). Print and write files only where :func:`is_primary`.

Typical script::

    from moesd_jax import distributed
    distributed.initialize_distributed()      # no-op without a coordinator
    plan = ShardingPlan.load("ep")            # a mesh over every process's devices
    ...
    if distributed.is_primary():
        print(results)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_initialized = False


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: list[int] | None = None) -> bool:
    """Joins the JAX distributed runtime when there is more than one process.

    Arguments left None are read from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``. With no coordinator and ``num_processes`` unset or 1 this is a
    no-op (single process). ``num_processes`` > 1 without a coordinator lets JAX detect
    the cluster (SLURM, Open MPI, TPU pods, Kubernetes). Must run before any other JAX
    call that touches devices; calling it again is a no-op.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      local_device_ids: devices of this host this process uses (default: all).

    Returns:
      True when running multi-process after the call.
    """
    global _initialized
    if _initialized:
        return jax.process_count() > 1
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if coordinator_address is None and (num_processes is None or num_processes == 1):
        return False
    if num_processes is not None and process_id is not None and not (
            0 <= process_id < num_processes):
        raise ValueError(f"process_id={process_id} must be in [0, num_processes="
                         f"{num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    _initialized = True
    return jax.process_count() > 1


def shutdown() -> None:
    """Leaves the distributed runtime (if this module joined it)."""
    global _initialized
    if _initialized:
        jax.distributed.shutdown()
        _initialized = False


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """True on process 0 (the one that prints and writes files)."""
    return jax.process_index() == 0


def process_allgather(x: Any) -> Any:
    """Every leaf of ``x`` as a full host numpy array on every process.

    Global arrays are gathered (a collective: every process must call this); arrays this
    process holds entirely (and plain numpy / Python values) are converted locally.
    """

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, x)


to_host = process_allgather


def gather_from_processes(x: Any) -> Any:
    """Every process's host value of ``x``, stacked: each leaf ``[process_count, ...]``.

    For small host data that differs per process (per-host input rows, counts); every
    process must call it with the same shapes. One process: ``x[None]`` per leaf.
    """
    if jax.process_count() == 1:
        return jax.tree.map(lambda a: np.asarray(a)[None], x)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(x, tiled=False))


def sync(name: str = "moesd_sync") -> None:
    """Barrier across processes (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_primary(x: Any) -> Any:
    """Process 0's value of ``x`` (a pytree of arrays) on every process."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(x)
