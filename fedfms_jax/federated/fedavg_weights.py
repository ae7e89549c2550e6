"""FedAvg's client weights: each client's share of the training samples.

"exact" is the share itself; "rounded" is the original FedFMS scripts' rule: every share
rounded to two decimals, the last client taking what is left (1 - the others' sum), so
[10, 20, 33] samples give [0.16, 0.32, 0.52] instead of [0.159, 0.317, 0.524].
The simulation (train.py) and the deployed server (deploy/server_state.py) both use it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

WEIGHT_RULES = ("rounded", "exact")


def fedavg_weights(num_samples: Sequence[int], rule: str = "exact", total: int | None = None) -> np.ndarray:
    """float32 weights of the clients holding `num_samples` training samples.

    `total` is every client's samples together (default: these clients'); when only some
    clients are given, the last of them takes their shares' sum less the others' rounded ones."""
    if rule not in WEIGHT_RULES:
        raise ValueError(f"client weights rule must be one of {WEIGHT_RULES}, got {rule!r}")
    n = np.asarray(num_samples, np.float64)
    shares = n / float(n.sum() if total is None else total)
    if rule == "rounded" and len(shares):
        rounded = np.round(shares[:-1], 2)
        shares = np.append(rounded, shares.sum() - rounded.sum())
    return shares.astype(np.float32)
