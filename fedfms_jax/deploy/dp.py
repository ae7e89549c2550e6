"""Client-level differential privacy: clip each client's round update, add Gaussian noise.

Each hospital clips its update (trained - global trainable leaves, all leaves together)
to L2 norm `clip` and adds N(0, (noise_multiplier * clip)^2) to every coordinate before
the update leaves the site. One round is then a Gaussian mechanism of sensitivity
`clip` on the site's whole dataset (client-level, add/remove-one-client adjacency), and
the guarantee holds against everyone who sees the update, the server included; it
composes with secure aggregation. The budget over the rounds a client took part in is
computed with Google's `dp_accounting` (RDP accountant), never by hand.
"""
from __future__ import annotations

import dataclasses

import numpy as np

RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512])


@dataclasses.dataclass(frozen=True)
class DPConfig:
    clip: float = 0.0               # L2 bound on a client's update; 0 disables DP
    noise_multiplier: float = 0.0   # noise std = noise_multiplier * clip
    delta: float = 1e-5

    @property
    def enabled(self) -> bool:
        return self.clip > 0

    def validate(self) -> None:
        if self.clip < 0 or self.noise_multiplier < 0:
            raise ValueError("dp clip and noise multiplier must be >= 0")
        if self.enabled and not 0 < self.delta < 1:
            raise ValueError(f"dp delta must be in (0, 1), got {self.delta}")


def clip_and_noise(update: list[np.ndarray], dp: DPConfig, rng: np.random.Generator):
    """Clip the update (list of leaves) to global L2 norm dp.clip and add Gaussian noise.

    Returns (private leaves float32, norm before clipping, clip scale applied)."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update)))
    scale = min(1.0, dp.clip / norm) if norm > 0 else 1.0
    std = dp.noise_multiplier * dp.clip
    out = []
    for u in update:
        x = u.astype(np.float64) * scale
        if std > 0:
            x = x + rng.normal(0.0, std, size=u.shape)
        out.append(x.astype(np.float32))
    return out, norm, scale


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` releases of a Gaussian mechanism with this noise
    multiplier (every client takes part in every round: no sampling amplification)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    accountant = rdp.RdpAccountant(list(RDP_ORDERS))
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), int(rounds))
    return float(accountant.get_epsilon(delta))


def budget_record(dp: DPConfig, rounds: int) -> dict:
    """The block written to metrics.jsonl each round when DP is on."""
    return {"clip": dp.clip, "noise_multiplier": dp.noise_multiplier, "delta": dp.delta,
            "rounds": int(rounds), "epsilon": epsilon(dp.noise_multiplier, rounds, dp.delta),
            "accountant": "dp_accounting.rdp.RdpAccountant"}
