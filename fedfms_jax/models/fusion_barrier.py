"""An identity that stops XLA:CPU from fusing the backward pass across encoder blocks.

In the backward pass the residual-stream cotangent of block i is the previous block's
cotangent plus elementwise LayerNorm-backward terms. XLA:CPU treats that chain as cheap
and re-fuses it, from the last block down, into every consumer that needs a transposed
copy (each trainable weight's gradient), so the chain is recomputed once per block:
quadratic in depth. For FedMSA ViT-B at 256 this was a third of the step (about 1 s of
transposing copies per local step on 2 cores). Passing the cotangent through an opaque
host call at each block boundary materialises it once.

Only the "cpu" kernel plan (models/kernels) places it: GPU fusion does not show the
problem, and there a host call would cost a device round trip.
"""
from __future__ import annotations

import jax
import numpy as np

__all__ = ["cotangent_barrier"]


def _identity(a):
    return np.asarray(a)


@jax.custom_vjp
def cotangent_barrier(x: jax.Array) -> jax.Array:
    """Identity in the forward pass; its cotangent is materialised once, by the host."""
    return x


def _fwd(x):
    return x, None


def _bwd(_, g):
    shape = jax.ShapeDtypeStruct(g.shape, g.dtype)
    return (jax.pure_callback(_identity, shape, g, vmap_method="expand_dims"),)


cotangent_barrier.defvjp(_fwd, _bwd)
