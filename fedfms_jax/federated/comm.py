"""Exact communication accounting from the trainable subtree.

Per participating client and round: download = the global trainable leaves, upload = its
trained leaves. With only_nonzero_grad, a client uploads only the leaves that received a
non-zero gradient in the round (e.g. Depth adapters get none on 2-D data) and downloads
only the leaves whose global value changed; both are lossless (the receiver already holds
the other leaves' values).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from fedfms_jax.federated.partition import Partition


def trainable_leaf_bytes(partition: Partition) -> np.ndarray:
    """Bytes of each trainable leaf, in `partition.trainable_paths` order (int64)."""
    return np.asarray([partition.leaf_bytes(p) for p in partition.trainable_paths], np.int64)


def comm_bytes(partition: Partition, only_nonzero_grad: bool = False, touched=None) -> int:
    """Bytes one client uploads (= downloads) per round.

    only_nonzero_grad needs `touched`: per trainable leaf bool (trainable_paths order),
    e.g. `metrics["touched"][c]` from a round.
    """
    b = trainable_leaf_bytes(partition)
    if not only_nonzero_grad:
        return int(b.sum())
    if touched is None:
        raise ValueError("only_nonzero_grad needs the per-leaf `touched` flags of a round")
    t = np.asarray(touched, bool)
    if t.shape != b.shape:
        raise ValueError(f"touched has shape {t.shape}, expected {b.shape}")
    return int(b[t].sum())


def round_comm(partition: Partition, metrics: Mapping, only_nonzero_grad: bool = False) -> dict:
    """Per-client upload/download bytes of one round from its metrics (host numpy).

    Returns {"upload": int64[C], "download": int64[C], "upload_total", "download_total"};
    clients that did not take part (metrics["active"] False) send and receive nothing.
    """
    b = trainable_leaf_bytes(partition)
    active = np.asarray(metrics["active"], bool)
    if only_nonzero_grad:
        touched = np.asarray(metrics["touched"], bool)  # [C, L]
        changed = np.asarray(metrics["changed"], bool)  # [L]
        up = (touched.astype(np.int64) * b[None]).sum(axis=1)
        down = np.full(active.shape, int(b[changed].sum()), np.int64)
    else:
        up = np.full(active.shape, int(b.sum()), np.int64)
        down = up.copy()
    up = np.where(active, up, 0)
    down = np.where(active, down, 0)
    return {
        "upload": up,
        "download": down,
        "upload_total": int(up.sum()),
        "download_total": int(down.sum()),
    }
