"""The server's side of a deployed run, free of Flower: global state, aggregation,
checkpoints, metrics.jsonl and results.json in the training CLI's formats.

Aggregation is the simulation engine's: the weighted mean of client updates with
`federated.aggregate` (sample-count weights, renormalised over the clients whose update
arrived and is finite), then the engine's server optimizer (FedAvg adds the mean update;
FedAvgM/FedAdam step on the pseudo-gradient -mean update), all in one jitted call.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedfms_jax import model_init, run_state, workdir as wd
from fedfms_jax.checkpoint import Checkpointer
from fedfms_jax.federated import aggregate
from fedfms_jax.federated.comm import comm_bytes


class ServerState:
    """Global trainable parameters + server optimizer state of run `cfg` in `workdir`."""

    def __init__(self, cfg: dict, workdir: Path):
        run_state.enable_compilation_cache()
        self.cfg = cfg
        _, model, info = model_init.build_model(cfg)
        self.engine = run_state.make_engine(cfg, model)
        self.partition = self.engine.partition
        self.server = self.engine.server
        self.model_info = dict(info, trainable_params=self.partition.count(True),
                               frozen_params=self.partition.count(False))
        self.global_params = jax.device_get(self.engine.initial_trainable)
        self.server_opt_state = self.server.tx.init(self.global_params)
        self.round = 0
        self.train_seconds = 0.0
        self.bytes_each_way = comm_bytes(self.partition)
        self.path, self.resuming = wd.prepare(workdir, cfg)
        if not self.resuming:
            wd.create(self.path, cfg)
        self.ckpt = Checkpointer(self.path / wd.CKPT_DIR, keep=cfg["checkpoint_keep"])
        self.mlog = wd.MetricsLog(self.path / wd.METRICS_FILE)
        self._mean = jax.jit(_mean_update)
        self._step = jax.jit(self.server.step)

    # ------------------------------------------------------------------- checkpoints
    def restore_latest(self) -> int:
        """Load the latest checkpoint (if any); trims metrics.jsonl past it. Returns its round."""
        latest = self.ckpt.latest_round()
        if latest is None:
            self.mlog.truncate_after(-1)
            return 0
        tree, meta = self.ckpt.restore(latest, self._tree())
        self.global_params = jax.device_get(tree["global"])
        self.server_opt_state = jax.device_get(tree["server_opt"])
        self.round, self.train_seconds = int(meta["round"]), float(meta["train_seconds"])
        self.mlog.truncate_after(latest)
        return latest

    def _tree(self) -> dict:
        return {"global": self.global_params, "server_opt": self.server_opt_state}

    def save(self, meta: dict | None = None) -> None:
        self.ckpt.save(self.round, self._tree(),
                       dict(meta or {}, round=self.round, train_seconds=self.train_seconds))

    # ------------------------------------------------------------------- aggregation
    def leaves(self) -> list[np.ndarray]:
        return [np.asarray(x) for x in self.partition.flatten_trainable(self.global_params)]

    def weights(self, num_samples: Sequence[int], total_samples: int) -> np.ndarray:
        """FedAvg weights as the simulation computes them: samples / all training samples."""
        w = np.asarray(num_samples, np.float32)
        return w / np.float32(total_samples)

    def mean_update(self, updates: Sequence[Sequence[np.ndarray]], weights: np.ndarray):
        """Weighted mean of the clients' update leaves; clients with a non-finite update
        get weight 0. Returns (mean update tree, finite flags [C])."""
        from fedfms_jax.deploy.payload import leaves_to_tree
        trees = [leaves_to_tree(self.partition, [np.asarray(x, np.float32) for x in u]) for u in updates]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *trees)
        mean, finite = self._mean(stacked, jnp.asarray(weights, jnp.float32))
        return mean, np.asarray(finite)

    def apply(self, mean_update, ok: bool = True) -> None:
        """Server optimizer step with the mean update; round counter advances."""
        if ok:
            g, ss = self._step(self.global_params, self.server_opt_state, mean_update)
            self.global_params, self.server_opt_state = jax.device_get(g), jax.device_get(ss)
        self.round += 1

    # ------------------------------------------------------------------- outputs
    def log_round(self, record: dict) -> None:
        self.mlog.append(record)

    def records(self) -> dict[int, dict]:
        return {r["round"]: r for r in self.mlog.records()}

    def write_results(self, train_sites: list[str], unseen: str | None, extra: dict) -> dict:
        from fedfms_jax.train import _block
        records = self.records()
        evals = [records[r]["eval"] for r in sorted(records) if "eval" in records[r]]
        initial = records.get(0, {}).get("eval")
        cfg = self.cfg
        results = {
            "config_name": cfg["name"], "federation": cfg["federation"], "method": cfg["method"],
            "mode": cfg["mode"], "rounds": cfg["rounds"], "train_sites": train_sites,
            "unseen_site": unseen, "initial": _block(initial), "final": _block(evals[-1] if evals else None),
            "comm_bytes_per_round_per_client": self.bytes_each_way,
            "comm_bytes_per_round_per_client_both_ways": 2 * self.bytes_each_way,
            "trainable_params": self.model_info["trainable_params"],
            "train_seconds": round(self.train_seconds, 3), "deploy": extra,
        }
        wd.write_atomic(self.path / wd.RESULTS_FILE, json.dumps(results, indent=1, sort_keys=True) + "\n")
        return results

    def close(self) -> None:
        self.ckpt.close()


def _mean_update(stacked, weights):
    finite = aggregate.client_finite(stacked, jnp.zeros(weights.shape, jnp.float32))
    wn, _ = aggregate.effective_weights(weights, jnp.ones(weights.shape, bool), finite)
    return aggregate.weighted_mean(stacked, wn), finite


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self) -> float:
        return time.time() - self.t0
