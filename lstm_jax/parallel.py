"""Device mesh, shardings, multi-host start-up, and the thin pmap variant of the train step.

The default path is SPMD: one `jax.jit` over a ('data',) mesh, state replicated, batches sharded on
their leading axis. Nothing here knows about LSTMs.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D ('data',) mesh over all (or the given) devices, with Auto axis types.

    Auto is explicit here because the Explicit default breaks embedding gathers on sharded ids.
    """
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (DATA_AXIS,),
                axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Global batches must split evenly over devices and processes."""
    n = mesh.devices.size
    if global_batch % n:
        lo, hi = (global_batch // n) * n, (global_batch // n + 1) * n
        raise ValueError(
            f"{what}={global_batch} does not divide by the {n} devices of the mesh; "
            f"use a multiple of {n} (e.g. {lo or hi} or {hi}), or set per_device_batch_size")


def first_devices(n: int) -> list[jax.Device]:
    """n devices for the mesh, n / process_count from each process, in process order (each
    process feeds its own devices: `process_rows` and `to_global` rely on it)."""
    p = jax.process_count()
    if n % p or n // p > jax.local_device_count():
        raise ValueError(
            f"parallel.num_devices={n} must be a multiple of the {p} processes and at most "
            f"{jax.device_count()} (each process needs the same number of its own devices in the "
            f"mesh); use 0 for all {jax.device_count()} devices")
    by_process = [[d for d in jax.devices() if d.process_index == i] for i in range(p)]
    return [d for devs in by_process for d in devs[:n // p]]


def process_rows(global_batch: int) -> slice:
    """Rows of the global batch that this process loads (contiguous, in process order)."""
    per = global_batch // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def to_global(local_rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """Places this process's rows as its slice of one global array sharded over 'data'."""
    return jax.make_array_from_process_local_data(data_sharded(mesh), local_rows)


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
    """`jax.distributed.initialize` with '' / 0 / -1 meaning "let JAX auto-detect" (TPU pods,
    SLURM, ...). Must run before any JAX computation. CPU processes use gloo collectives."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes > 0:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)


def replicate_for_pmap(tree, devices: Sequence[jax.Device]):
    """Stacks a host pytree once per device of this process along a new leading axis, placed for
    `jax.pmap` (which takes host-local arrays: one entry per local device)."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    sharding = NamedSharding(Mesh(np.asarray(local), ("pmap",)), P("pmap"))
    return jax.tree.map(lambda x: jax.device_put(np.stack([np.asarray(x)] * len(local)), sharding), tree)


def barrier(name: str) -> None:
    """Waits until every process reaches this point (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def max_over_processes(value: int) -> int:
    """The largest `value` any process passed (every process gets it; one small all-gather).
    Lets processes agree on a flag (0/1) or a signal number without a device program per step."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.array([value], np.int32))))


def split_for_pmap(tree, devices: Sequence[jax.Device]):
    """Splits host arrays' leading axis (this process's rows) over this process's devices, as a
    leading device axis for `jax.pmap` (a stream carry: each device keeps its own rows)."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    sharding = NamedSharding(Mesh(np.asarray(local), ("pmap",)), P("pmap"))
    return jax.tree.map(lambda x: jax.device_put(
        np.asarray(x).reshape((len(local), -1) + np.shape(x)[1:]), sharding), tree)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of an array sharded over 'data' on its leading axis, in row order."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    starts = sorted({s.index[0].start or 0 for s in shards})
    return np.concatenate([np.asarray(next(s for s in shards if (s.index[0].start or 0) == a).data)
                           for a in starts])
