"""Server optimizers applied to the pseudo-gradient  delta = global - weighted_mean(clients).

FedAvg is SGD with lr 1: new global = global + weighted mean of the client updates
(applied directly, without negating twice). FedAvgM adds server momentum,
FedAdam is Adam on the pseudo-gradient (Reddi et al., "Adaptive Federated Optimization").
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class ServerOptimizer:
    name: str
    tx: optax.GradientTransformation
    # True when the step is exactly "global += weighted mean update" (FedAvg).
    plain_average: bool = False

    def step(self, global_params, opt_state, mean_update):
        """New (global, optimizer state) from the weighted mean of the client updates."""
        if self.plain_average:
            return jax.tree.map(jnp.add, global_params, mean_update), opt_state
        pseudo_grad = jax.tree.map(jnp.negative, mean_update)  # global - mean(x_c)
        updates, opt_state = self.tx.update(pseudo_grad, opt_state, global_params)
        return optax.apply_updates(global_params, updates), opt_state


def server_optimizer(name: str = "fedavg", **kw) -> ServerOptimizer:
    """'fedavg' (lr=1.0), 'fedavgm' (lr=1.0, momentum=0.9, nesterov=False),
    'fedadam' (lr=1e-3, b1=0.9, b2=0.99, eps=1e-3)."""
    name = name.lower()
    if name == "fedavg":
        lr = kw.pop("lr", 1.0)
        _no_more(name, kw)
        return ServerOptimizer(name, optax.sgd(lr), plain_average=(lr == 1.0))
    if name == "fedavgm":
        lr = kw.pop("lr", 1.0)
        momentum = kw.pop("momentum", 0.9)
        nesterov = kw.pop("nesterov", False)
        _no_more(name, kw)
        return ServerOptimizer(name, optax.sgd(lr, momentum=momentum, nesterov=nesterov))
    if name == "fedadam":
        lr = kw.pop("lr", 1e-3)
        b1 = kw.pop("b1", 0.9)
        b2 = kw.pop("b2", 0.99)
        eps = kw.pop("eps", 1e-3)
        _no_more(name, kw)
        return ServerOptimizer(name, optax.adam(lr, b1=b1, b2=b2, eps=eps))
    raise ValueError(f"unknown server optimizer {name!r}: fedavg, fedavgm, fedadam")


def _no_more(name, kw):
    if kw:
        raise TypeError(f"unexpected options for {name}: {sorted(kw)}")
