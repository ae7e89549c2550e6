"""Segmentation losses on low-resolution mask logits, masked over padded batch rows.

All losses take logits [B, H, W, K], targets [B, H, W, K] (any dtype; > 0 is foreground)
and an optional `valid` [B] bool. Padded rows (valid=False) contribute nothing, and the
mean is over valid rows only, so a padded batch gives exactly the loss of the smaller
unpadded batch (the original's last, shorter batch). Computed in float32.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _prep(logits, targets, valid):
    x = logits.astype(jnp.float32)
    y = (targets > 0).astype(jnp.float32) if targets.dtype != jnp.float32 else targets
    if valid is None:
        valid = jnp.ones(x.shape[:1], bool)
    return x, y, valid


def _masked_row_mean(per_row, valid):
    n = jnp.sum(valid)
    total = jnp.sum(jnp.where(valid, per_row, 0.0))
    return total / jnp.maximum(n, 1).astype(jnp.float32)


def bce_with_logits(logits, targets, valid=None, *, pos_weight: float = 2.0):
    """torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight), mean reduction:
    -[pw * y * log sigmoid(x) + (1 - y) * log sigmoid(-x)], averaged over all elements."""
    x, y, valid = _prep(logits, targets, valid)
    elem = -(pos_weight * y * jax.nn.log_sigmoid(x) + (1.0 - y) * jax.nn.log_sigmoid(-x))
    per_row = elem.reshape(elem.shape[0], -1).mean(axis=1)
    return _masked_row_mean(per_row, valid)


def dice_loss(logits, targets, valid=None, *, smooth: float = 1.0):
    """1 - soft Dice of sigmoid(logits), per sample and class, averaged."""
    x, y, valid = _prep(logits, targets, valid)
    p = jax.nn.sigmoid(x)
    axes = tuple(range(1, x.ndim - 1))
    inter = jnp.sum(p * y, axis=axes)
    denom = jnp.sum(p, axis=axes) + jnp.sum(y, axis=axes)
    dice = (2.0 * inter + smooth) / (denom + smooth)  # [B, K]
    per_row = 1.0 - dice.mean(axis=-1)
    return _masked_row_mean(per_row, valid)


def dice_bce(logits, targets, valid=None, *, pos_weight: float = 2.0, dice_weight: float = 1.0):
    return bce_with_logits(logits, targets, valid, pos_weight=pos_weight) + dice_weight * dice_loss(
        logits, targets, valid
    )


def get_loss(name: str, *, pos_weight: float = 2.0) -> Callable:
    """'bce' (the original) or 'dice_bce' -> loss(logits, targets, valid) -> scalar."""
    if name == "bce":
        return lambda x, y, v=None: bce_with_logits(x, y, v, pos_weight=pos_weight)
    if name == "dice_bce":
        return lambda x, y, v=None: dice_bce(x, y, v, pos_weight=pos_weight)
    raise ValueError(f"unknown loss {name!r}: use 'bce' or 'dice_bce'")
