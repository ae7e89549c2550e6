"""Small building blocks shared by every SAM-family module."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Buffer(nnx.Variable):
    """A fixed tensor that PyTorch keeps in the state dict but never trains
    (e.g. the prompt encoder's random Fourier matrix). Not an nnx.Param, so it is never
    trainable, never averaged and never sent."""


def gelu(x: jax.Array) -> jax.Array:
    # PyTorch's nn.GELU default is the exact erf form, not the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


class LayerNorm2d(nnx.Module):
    """SAM's LayerNorm2d over the channel axis of an NHWC tensor.

    Parameters are named `weight` and `bias` as in PyTorch (no leaf rename needed).
    Statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        y = (x32 - mean) / jnp.sqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(self.dtype)
