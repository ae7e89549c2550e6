"""Medical SAM Adapter (MSA) bottleneck: x -> fc2(GELU(fc1(x))) [+ x].

Attribute names `D_fc1` / `D_fc2` mirror the PyTorch original so checkpoint keys
(`...Space_Adapter.D_fc1.weight`) map through the shared conversion rules unchanged.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.models.common import gelu
from fedfms_jax.models.kernels import KernelPlan, resolve_kernels


class Adapter(nnx.Module):
    """Bottleneck adapter with hidden width `int(dim * mlp_ratio)` (768 -> 192 -> 768).

    skip_connect: return `x + adapter(x)` (Space adapter) instead of `adapter(x)`
        (MLP and Depth adapters, whose caller adds the result).
    zero_init: zero the up-projection `D_fc2` so the adapter's output is exactly 0
        (or exactly x with skip): an adapted model then starts equal to its base.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 0.25,
        skip_connect: bool = True,
        zero_init: bool = False,
        *,
        dtype=jnp.float32,
        kernels: KernelPlan | str = "auto",
        rngs: nnx.Rngs,
    ):
        hidden = int(dim * mlp_ratio)
        self.skip_connect = skip_connect
        kw = dict(param_dtype=jnp.float32, rngs=rngs, **resolve_kernels(kernels).linear_options(dtype))
        self.D_fc1 = nnx.Linear(dim, hidden, **kw)
        if zero_init:
            kw.update(kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.zeros)
        self.D_fc2 = nnx.Linear(hidden, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        xs = self.D_fc2(gelu(self.D_fc1(x)))
        return x + xs if self.skip_connect else xs


def torch_linear_default(rng: np.random.Generator, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    """One draw of PyTorch's default `nn.Linear` init, in Flax layout (kernel [in, out], bias [out]).

    kaiming_uniform(a=sqrt(5)) on the weight and the bias rule both come to
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the weight is drawn in PyTorch's [out, in] order.
    """
    bound = 1.0 / math.sqrt(fan_in)
    weight = rng.uniform(-bound, bound, (fan_out, fan_in))
    bias = rng.uniform(-bound, bound, fan_out)
    return weight.T, bias
