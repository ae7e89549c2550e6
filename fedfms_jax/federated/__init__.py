"""Federated engine: trainable/frozen partition, vmapped client updates over a client
mesh axis, jitted aggregation and server optimizers, communication accounting."""
from fedfms_jax.federated.aggregate import client_weights, participation_mask
from fedfms_jax.federated.comm import comm_bytes, round_comm
from fedfms_jax.federated.mesh import client_mesh, init_distributed, to_host, tree_to_host
from fedfms_jax.federated.partition import PRESETS, Partition, make_partition
from fedfms_jax.federated.round import FederatedEngine, FedState, sam_forward
from fedfms_jax.federated.server_optim import ServerOptimizer, server_optimizer

__all__ = [
    "PRESETS", "Partition", "make_partition", "FederatedEngine", "FedState", "sam_forward",
    "ServerOptimizer", "server_optimizer", "client_weights", "participation_mask",
    "comm_bytes", "round_comm", "client_mesh", "init_distributed", "to_host", "tree_to_host",
]
