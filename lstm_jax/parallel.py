"""Device mesh, shardings, multi-host start-up, and placements: how a run's arrays live on devices.

The default path is SPMD (`MeshPlacement`): one `jax.jit` over a ('data',) mesh, state replicated,
batches sharded on their leading axis. `PmapPlacement` is the thin `jax.pmap` variant (one copy of
the state per device) over the same pure step function. The training loop sees only the
placement's interface. Nothing here knows about LSTMs.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
PMAP_AXIS = "batch"


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


def is_main_process() -> bool:
    """Process 0: the one that writes files and prints."""
    return jax.process_index() == 0


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


def gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) sharded array as one host array."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of an array sharded over 'data' on its leading axis, in row order."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    starts = sorted({s.index[0].start or 0 for s in shards})
    return np.concatenate([np.asarray(next(s for s in shards if (s.index[0].start or 0) == a).data)
                           for a in starts])


# --- placements: a pure step function and the run's arrays, on a mesh or under pmap ------------

def traced_on(fn: Callable, mesh: Optional[Mesh]) -> Callable:
    """`fn` traced with `mesh` as the abstract mesh, so code inside it that maps itself over the
    mesh's devices (the native recurrence's `shard_map`: each device's rows, no collectives) sees
    it; `fn` itself without a mesh. Wrap before `jax.jit`."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


def jit_step(step_fn: Callable, mesh: Optional[Mesh] = None) -> Callable:
    """`step_fn(state, batch, key, carry_sharding=...)` jitted, state donated; on a `mesh` a
    stream carry stays sharded like the batch."""
    step = functools.partial(step_fn, carry_sharding=data_sharded(mesh) if mesh else None)
    return jax.jit(traced_on(step, mesh), donate_argnums=0)


def pmap_step(step_fn: Callable, devices: Optional[Sequence[jax.Device]] = None) -> Callable:
    """`step_fn(state, batch, key, axis_name=...)` under `jax.pmap` over `devices` (state and
    batch with a leading device axis, the key shared), state donated."""
    return jax.pmap(functools.partial(step_fn, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS,
                    donate_argnums=0, in_axes=(0, 0, None), devices=devices)


class MeshPlacement:
    """The default: the state as built (replicated, a stream carry sharded over 'data'), each
    batch one global array sharded over 'data', the step jitted."""

    def __init__(self, mesh: Mesh, global_batch: int):
        self.mesh = mesh
        self.rows = process_rows(global_batch)    # this process's rows of every global batch

    def compile(self, step_fn: Callable) -> Callable:
        return jit_step(step_fn, self.mesh)

    def place_state(self, state):
        return state

    def place_batch(self, rows: np.ndarray):
        return to_global(rows, self.mesh)

    def global_state(self, state):
        """The state as arrays over the mesh (what Orbax saves and evaluation reads)."""
        return state


class PmapPlacement(MeshPlacement):
    """One copy of params and optimizer state per device of the mesh under `jax.pmap`, each
    device holding its own rows of a stream carry and of every batch."""

    def __init__(self, mesh: Mesh, global_batch: int):
        super().__init__(mesh, global_batch)
        self.devices = list(mesh.devices.flat)   # pmap wants the same list on every process
        self.n_local = sum(d.process_index == jax.process_index() for d in self.devices)

    def compile(self, step_fn: Callable) -> Callable:
        return pmap_step(step_fn, self.devices)

    def place_state(self, state):
        placed = replicate_for_pmap(jax.device_get(state.replace(carry=None)), self.devices)
        carry = jax.tree.map(local_rows, state.carry)
        return placed.replace(carry=split_for_pmap(carry, self.devices))

    def place_batch(self, rows: np.ndarray):
        return rows.reshape((self.n_local, -1) + rows.shape[1:])

    def global_state(self, state):
        """Device 0's copy, replicated over the mesh: pmap's outputs are host-local, which Orbax
        refuses in a multi-process run; the carry's rows gathered back into one global array."""
        sharding, mesh = replicated(self.mesh), self.mesh
        glob = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x[0])),
                            state.replace(carry=None))
        rows = lambda x: to_global(np.asarray(x).reshape((-1,) + x.shape[2:]), mesh)  # noqa: E731
        return glob.replace(carry=jax.tree.map(rows, state.carry))


def placement(mode: str, mesh: Mesh, global_batch: int) -> MeshPlacement:
    """The placement of `parallel.mode`: 'pmap' or the mesh (anything else)."""
    return (PmapPlacement if mode == "pmap" else MeshPlacement)(mesh, global_batch)
