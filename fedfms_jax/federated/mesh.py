"""The clients mesh axis, host <-> global array transfer, multi-host start-up.

Clients are a mesh axis over all (global) devices. Arrays are built from host numpy
with make_array_from_callback, which works the same in one process and in several
(each process fills only the shards on its own devices).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CLIENTS = "clients"


def client_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D mesh ('clients',) over `devices` (default: all global devices). Auto axis
    types: Explicit rejects the conv reshape under a client-sharded vmap."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),), (CLIENTS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def padded_num_clients(num_clients: int, mesh: Mesh) -> int:
    """Clients padded up to a multiple of the mesh's client-axis size."""
    d = mesh.shape[CLIENTS]
    return -(-num_clients // d) * d


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def client_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
    return NamedSharding(mesh, P(*([None] * axis), CLIENTS))


def to_global(x, sharding: NamedSharding) -> jax.Array:
    """Host value (identical on every process) -> global jax.Array with `sharding`."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, jax.Array) and x.is_fully_addressable and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise ValueError("already a multi-process array; pass it through unchanged")
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def tree_to_global(tree, sharding: NamedSharding):
    return jax.tree.map(lambda x: to_global(x, sharding), tree)


def to_host(x) -> np.ndarray:
    """Global array -> numpy on this process (replicated: local copy; sharded: gathered)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree):
    return jax.tree.map(to_host, tree)


def init_distributed(coordinator_address: str, num_processes: int, process_id: int, *,
                     cpu_collectives: str | None = None, timeout_s: int = 300) -> None:
    """jax.distributed.initialize for a process-spanning mesh. On CPU set
    cpu_collectives='gloo' so that cross-process reductions work."""
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )
