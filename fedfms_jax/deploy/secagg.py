"""One training round under Flower's SecAgg+ workflow.

Flower 1.42 ships SecAgg+ as a legacy workflow (`SecAggPlusWorkflow`, driven by a
`LegacyContext` and a legacy `Strategy`) with `secaggplus_mod` on the client. Each round
runs that workflow once: the clients' updates (trained - global, after optional DP) are
quantised, masked and summed with weight `num_examples` = the site's training samples;
the server only ever sees the weighted mean update, to which it applies the engine's
server optimizer like in a plain round.

Quantisation: an update coordinate is clipped to +-secagg_clip_range and mapped to
secagg_quantization_range levels; max_weight is the largest site's sample count so the
per-client weight is represented to 1/quantization_range.
"""
from __future__ import annotations

import json

import numpy as np


def _strategy_cls():
    from flwr.common import FitIns, ndarrays_to_parameters  # noqa: F401
    from flwr.server.strategy import Strategy

    class MeanUpdate(Strategy):
        """Legacy strategy that hands SecAgg+'s aggregate back untouched."""

        def __init__(self, proxies, config):
            self.proxies, self.config = proxies, config
            self.mean = None
            self.per_client = {}

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(p, FitIns(parameters, dict(self.config))) for p in self.proxies]

        def aggregate_fit(self, server_round, results, failures):
            from flwr.common import parameters_to_ndarrays
            for _, res in results:
                m = dict(res.metrics)
                self.per_client[str(m.pop("site"))] = m
            if results:
                self.mean = [np.asarray(x, np.float32) for x in parameters_to_ndarrays(results[0][1].parameters)]
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return MeanUpdate


def secagg_round(coord, round_: int, trainers: dict[int, dict]):
    """Run SecAgg+ over the training nodes. Returns (mean update leaves in
    `trainable_paths` order or None, per-site metrics)."""
    from flwr.app import ConfigRecord
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.server_config import ServerConfig
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    opts = coord.opts
    if not trainers:
        return None, {}
    run_id = coord.context.run_id
    proxies = [GridClientProxy(n, coord.grid, run_id) for n in sorted(trainers)]
    strategy = _strategy_cls()(proxies, coord.config_fields(round_))
    ctx = LegacyContext(coord.context, config=ServerConfig(num_rounds=coord.cfg["rounds"]), strategy=strategy)
    params = ndarrays_to_parameters(coord.state.leaves())
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_, Key.START_TIME: 0.0})
    # Every node holds a share of every other's key; any 60% of them rebuild a dropped one.
    workflow = SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=0.6,
        max_weight=float(max(int(i["num_samples"]) for i in trainers.values())),
        clipping_range=float(opts["secagg_clip_range"]),
        quantization_range=int(opts["secagg_quantization_range"]),
        timeout=float(opts["round_timeout"]),
    )
    workflow(coord.grid, ctx)
    if strategy.mean is None:
        return None, strategy.per_client
    big = [float(np.max(np.abs(x))) for x in strategy.mean]
    if big and max(big) >= opts["secagg_clip_range"] * 0.999:
        print(f"[fedfms-server] warning: round {round_} mean update reaches the SecAgg+ clip range "
              f"{opts['secagg_clip_range']} (raise secagg-clip-range)", flush=True)
    for m in strategy.per_client.values():
        m["counted"] = 1
    return strategy.mean, strategy.per_client


__all__ = ["secagg_round", "json"]
