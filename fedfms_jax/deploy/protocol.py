"""Record names and deployment options shared by the ServerApp and the ClientApp.

Deployment-only options (secure aggregation, client-level DP, timeouts) come from the
Flower run config ([tool.flwr.app.config] of the app, overridable with
`flwr run --run-config`); the training config is the same configs/<x>.py file the
simulation uses. The server sends both to every node inside each message, as JSON:
`cfg["deploy"]` holds the deployment options.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedfms_jax.deploy.dp import DPConfig

CONFIG = "config"        # ConfigRecord: {"cfg": json, "round": int, WEIGHTS_SHA256: str}
WEIGHTS_SHA256 = "weights_sha256"  # the server's starting weights (see start_weights)
GLOBAL = "global"        # ArrayRecord: global trainable leaves, keyed by parameter path
UPDATE = "update"        # ArrayRecord: a client's update (trained - global)
METRICS = "metrics"      # MetricRecord: loss, steps, num_samples, ...
INFO = "info"            # ConfigRecord: site, metric block (JSON), "refused" (one line), ...
OPT_STATE = "fedfms.client_opt_state"  # ArrayRecord in the node's Context state

# Flower run-config keys -> (name in cfg["deploy"], default)
DEPLOY_OPTIONS: dict[str, tuple[str, Any]] = {
    "secagg": ("secagg", False),
    "secagg-clip-range": ("secagg_clip_range", 0.1),
    "secagg-quantization-range": ("secagg_quantization_range", 4194304),
    "dp-clip": ("dp_clip", 0.0),
    "dp-noise-multiplier": ("dp_noise_multiplier", 0.0),
    "dp-delta": ("dp_delta", 1e-5),
    "evaluate": ("evaluate", True),
    "min-nodes": ("min_nodes", 1),
    "round-timeout": ("round_timeout", 600.0),
    "wait-nodes-timeout": ("wait_nodes_timeout", 600.0),
}


def deploy_options(run_config: Mapping[str, Any]) -> dict:
    out = {}
    for key, (name, default) in DEPLOY_OPTIONS.items():
        value = run_config.get(key, default)
        out[name] = type(default)(value) if not isinstance(default, bool) else _bool(value)
    if out["min_nodes"] < 1:
        raise ValueError("min-nodes must be >= 1")
    return out


def _bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def dp_config(cfg: Mapping[str, Any]) -> DPConfig:
    d = cfg.get("deploy", {})
    dp = DPConfig(clip=float(d.get("dp_clip", 0.0)), noise_multiplier=float(d.get("dp_noise_multiplier", 0.0)),
                  delta=float(d.get("dp_delta", 1e-5)))
    dp.validate()
    return dp


def leaves_to_record(names: Sequence[str], leaves: Sequence[Any]):
    """ArrayRecord of `leaves` keyed by `names`. Here rather than in `payload` so that the
    ClientApp, which hands its work to the site worker, starts without importing JAX."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    return ArrayRecord({n: Array(np.asarray(x)) for n, x in zip(names, leaves)})

