"""The starting weights every node trains from: checked by hash, not sent.

The server hashes the initial parameters it built (frozen and trainable leaves, each with
its path, dtype and shape, as `init_from` and the seed make them) and sends that sha256
in every message. A node builds its model from its own copy of the weights (node config
`weights-dir`, else the run's `init_from`) and the same seed, hashes it the same way and
takes no part when the two differ.

Why a hash rather than the weights in the first message: the frozen part is most of the
model (FedMSA's ViT-B backbone: 89.7 M parameters, 360 MB) and never changes; a hospital
holds the published weights anyway, and a path that exists only on the server then fails
on the node at once, in one line, instead of training from other weights. The trainable
part still travels every round.
"""
from __future__ import annotations

import hashlib

import jax
import numpy as np

from fedfms_jax.federated.partition import path_to_str


def weights_sha256(trainable, frozen) -> str:
    """sha256 over every leaf of the trainable and frozen trees (path, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for tree in (trainable, frozen):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        for path, x in sorted(((path_to_str(p), x) for p, x in flat), key=lambda t: t[0]):
            a = np.ascontiguousarray(jax.device_get(x))
            h.update(f"{path}|{a.dtype}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def mismatch(node_sha: str, server_sha: str, init_from: str) -> str | None:
    """The one-line refusal when the node's starting weights are not the server's, else None."""
    if not server_sha or node_sha == server_sha:
        return None
    return (f"starting weights differ from the server's (sha256 {node_sha[:12]} here, {server_sha[:12]} on the "
            f"server; built from init_from={init_from}): point the node config's weights-dir at a copy of the "
            "run's init_from weights")
