"""The server's side of a deployed run, free of Flower: global state, aggregation,
checkpoints, metrics.jsonl and results.json in the training CLI's formats.

Aggregation is the simulation engine's server step (`federated.server_step`): the
weighted mean of the client updates (sample-count weights, renormalised over the clients
whose update arrived and is finite), then the engine's server optimizer, in one jitted call.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedfms_jax import model_init, results, run_state, workdir as wd
from fedfms_jax.trained_model import write_final
from fedfms_jax.checkpoint import Checkpointer
from fedfms_jax.deploy.payload import leaves_to_tree
from fedfms_jax.deploy.start_weights import weights_sha256
from fedfms_jax.federated import aggregate
from fedfms_jax.federated.comm import comm_bytes
from fedfms_jax.federated.fedavg_weights import fedavg_weights
from fedfms_jax.federated.partition import path_to_str
from fedfms_jax.federated.server_optim import ServerOptimizer
from fedfms_jax.federated.server_step import server_step


class ServerState:
    """Global trainable parameters + server optimizer state of run `cfg` in `workdir`."""

    def __init__(self, cfg: dict, workdir: Path):
        run_state.enable_compilation_cache()
        self.cfg = cfg
        # The training sites by name (the server reads no site's data): the model is built
        # as the simulation and every node build it.
        train_sites, _ = run_state.choose_sites(cfg, run_state.site_names(cfg), cfg["federation"])
        _, model, info = model_init.build_model(cfg, adapter_draws=len(train_sites))
        self.engine = run_state.make_engine(cfg, model)
        self.partition = self.engine.partition
        self.weights_sha256 = weights_sha256(self.engine.initial_trainable, self.engine.frozen)
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
        self._step = jax.jit(functools.partial(aggregate_updates, self.server))

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
        """FedAvg weights as the simulation computes them: shares of all training samples
        under the config's client_weights rule."""
        return fedavg_weights(num_samples, self.cfg["client_weights"], total=total_samples)

    def step(self, updates: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> np.ndarray:
        """One server step on the clients' update leaves (none: the global model stays);
        clients with a non-finite update get weight 0. The round counter advances.
        Returns the finite flags [C]."""
        self.round += 1
        if not len(updates):
            return np.zeros(0, bool)
        trees = [leaves_to_tree(self.partition, [np.asarray(x, np.float32) for x in u]) for u in updates]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *trees)
        g, ss, finite = self._step(self.global_params, self.server_opt_state, stacked,
                                   jnp.asarray(weights, jnp.float32))
        self.global_params, self.server_opt_state = jax.device_get(g), jax.device_get(ss)
        return np.asarray(finite)

    # ------------------------------------------------------------------- outputs
    def log_round(self, record: dict) -> None:
        self.mlog.append(record)

    def records(self) -> dict[int, dict]:
        return {r["round"]: r for r in self.mlog.records()}

    def write_results(self, train_sites: list[str], unseen: str | None, extra: dict) -> dict:
        """results.json and the portable final/ model, as a simulation run ends."""
        write_final(self.path, self.cfg, self.engine, self.global_params, round_=self.round)
        records = self.records()
        evals = [records[r]["eval"] for r in sorted(records) if "eval" in records[r]]
        out = results.assemble(self.cfg, train_sites, unseen, initial=records.get(0, {}).get("eval"),
                               final=evals[-1] if evals else None, bytes_each_way=self.bytes_each_way,
                               trainable_params=self.model_info["trainable_params"],
                               train_seconds=self.train_seconds, deploy=extra)
        results.write(self.path, out)
        return out

    def close(self) -> None:
        self.ckpt.close()


def aggregate_updates(server: ServerOptimizer, global_params, server_opt_state, updates, weights):
    """The engine's server step on updates that arrived over the network (each leaf
    [C, ...]); a client whose update is not finite does not count.
    Returns (global params, server optimizer state, finite flags [C])."""
    finite = aggregate.client_finite(updates, jnp.zeros(weights.shape, jnp.float32))
    g, ss, _ = server_step(server, global_params, server_opt_state, updates, weights, finite)
    return g, ss, finite


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self) -> float:
        return time.time() - self.t0
