"""One client's local update: several optimizer steps in one lax.scan, no host round trip.

The function built here is written for a single client; the round vmaps it over the
clients axis with the frozen parameters broadcast (in_axes=None), never copied.

A step whose batch has no valid row is a no-op: parameters AND optimizer state are left
exactly as they were (as if the step did not happen), which is how a client with fewer
batches than the longest client runs "one local epoch" inside a common scan length.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedfms_jax.federated.partition import Partition

# forward(model, images_uint8 [B,H,W,3]) -> logits [B,h,w,K]
Forward = Callable[[nnx.Module, jax.Array], jax.Array]
# loss(logits, targets, valid [B]) -> scalar, mean over valid rows
Loss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def tree_sq_dist(a, b):
    return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def make_loss_fn(graphdef, partition: Partition, forward: Forward, loss: Loss, prox_mu: float = 0.0):
    """loss_fn(trainable, frozen, rest, anchor, batch) -> (total, data_loss).

    `anchor` is the global trainable tree at the round start (FedProx's w_t); the
    proximal term (mu/2)||w - w_t||^2 is added when prox_mu > 0.
    """

    def loss_fn(trainable, frozen, rest, anchor, batch):
        model = nnx.merge(graphdef, partition.merge(trainable, frozen), rest)
        logits = forward(model, batch["image"])
        data = loss(logits, batch["mask"], batch["valid"])
        total = data
        if prox_mu:
            total = total + 0.5 * prox_mu * tree_sq_dist(trainable, jax.lax.stop_gradient(anchor))
        return total, data

    return loss_fn


def make_local_update(
    graphdef,
    partition: Partition,
    forward: Forward,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    prox_mu: float = 0.0,
):
    """local_update(trainable, opt_state, frozen, rest, anchor, batches) ->
    (trainable, opt_state, stats) for ONE client.

    batches: {"image": [T,B,H,W,3], "mask": [T,B,h,w,C], "valid": [T,B] bool}.
    stats: loss (mean data loss over executed steps), steps (executed steps, int32),
    touched (per trainable leaf: did any executed step give it a non-zero gradient).
    """
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, partition, forward, loss, prox_mu), has_aux=True)

    def local_update(trainable, opt_state, frozen, rest, anchor, batches: Mapping[str, Any]):
        def step(carry, batch):
            tr, os, loss_sum, steps, touched = carry
            (_, data_loss), grads = grad_fn(tr, frozen, rest, anchor, batch)
            updates, os = optimizer.update(grads, os, tr)
            tr = optax.apply_updates(tr, updates)
            touched = jax.tree.map(lambda t, g: t | jnp.any(g != 0), touched, grads)
            return tr, os, loss_sum + data_loss, steps + 1, touched

        def body(carry, batch):
            # A real branch for one client: a batch without valid rows costs nothing.
            # Under vmap the predicate is batched and cond becomes a select of both.
            active = jnp.any(batch["valid"])
            return jax.lax.cond(active, step, lambda c, b: c, carry, batch), None

        touched0 = jax.tree.map(lambda x: jnp.zeros((), bool), trainable)
        carry0 = (trainable, opt_state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), touched0)
        (tr, os, loss_sum, steps, touched), _ = jax.lax.scan(body, carry0, batches)
        stats = {
            "loss": loss_sum / jnp.maximum(steps, 1).astype(jnp.float32),
            "steps": steps,
            "touched": touched,
        }
        return tr, os, stats

    return local_update


def make_train_step(graphdef, partition: Partition, forward: Forward, loss: Loss,
                    optimizer: optax.GradientTransformation, prox_mu: float = 0.0):
    """A single plain (un-vmapped) optimizer step, for reference loops and debugging:
    step(trainable, opt_state, frozen, rest, anchor, batch) -> (trainable, opt_state, loss)."""
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, partition, forward, loss, prox_mu), has_aux=True)

    def step(trainable, opt_state, frozen, rest, anchor, batch):
        (_, data_loss), grads = grad_fn(trainable, frozen, rest, anchor, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, data_loss

    return step
