"""The server's half of a round, shared by the simulation engine and the Flower server.

From the clients' updates (trained - global, stacked on a leading clients axis), their
raw aggregation weights and which of them count this round (took part, update finite):
the weighted mean with the weights renormalised over the clients that count, then the
server optimizer (FedAvg adds the mean; FedAvgM/FedAdam step on the pseudo-gradient).
Pure and jittable: the engine calls it inside its jitted round, the Flower server on the
updates that arrived.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedfms_jax.federated import aggregate
from fedfms_jax.federated.server_optim import ServerOptimizer


def server_step(server: ServerOptimizer, global_params, server_opt_state, updates, weights, counts,
                weighted_mean=aggregate.weighted_mean):
    """New (global params, server optimizer state, normalised weights [C]).

    updates: the clients' trainable updates, each leaf [C, ...]; weights: [C] raw
    aggregation weights; counts: [C] bool. A round in which no client counts leaves the
    global parameters and the optimizer state exactly as they were. weighted_mean:
    (updates, normalised weights) -> mean tree (the engine passes its client-sharded one).
    """
    wn, total = aggregate.effective_weights(weights, counts)
    # Average the client updates (x_c - g), not the parameters: a leaf no client changed
    # stays bit-identical (sum_c w_c != 1 exactly in float32).
    mean_update = weighted_mean(updates, wn)
    stepped, stepped_state = server.step(global_params, server_opt_state, mean_update)
    any_counts = total > 0
    new_g = jax.tree.map(lambda a, b: jnp.where(any_counts, a, b), stepped, global_params)
    new_state = jax.tree.map(lambda a, b: jnp.where(any_counts, a, b), stepped_state, server_opt_state)
    return new_g, new_state, wn
