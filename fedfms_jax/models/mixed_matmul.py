"""Reduced-precision matmuls that stay on XLA:CPU's fast kernels, forward and backward.

On a CPU with bf16 matrix units (AMX), XLA:CPU runs a bf16 x bf16 product with a float32
result several times faster than float32 (measured here: 450-650 GFLOP/s against
110-150), but a product with a bf16 *result* falls back to a slow kernel (~110). Flax's
`Linear(dtype=bfloat16)` asks for bf16 results, and JAX's own transpose of a
float32-result product asks for bf16 gradients, so both directions miss the fast path.

`mixed_einsum` keeps bf16 operands, returns float32, and has a backward pass that casts
the cotangent to bf16 once and again asks for float32 results. Numerically this is
ordinary mixed precision: operands rounded to bf16, sums in float32.

Used only for bf16/fp16 compute on the CPU backend; float32 compute and accelerators
take the plain path, unchanged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["mixed_einsum", "mixed_dot_general", "use_mixed"]

F32 = jnp.float32


def use_mixed(dtype) -> bool:
    """Whether products in `dtype` should take the mixed path on this backend."""
    return jnp.dtype(dtype) != jnp.dtype(F32) and jax.default_backend() == "cpu"


def _operands(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    a, b = inputs.split(",")
    if "." in spec or not set(a) <= set(b + out) or not set(b) <= set(a + out):
        # Each operand's gradient is then the einsum of the other two (no index of one
        # operand is summed away alone).
        raise ValueError(f"mixed_einsum supports two-operand specs without lone summed indices, got {spec!r}")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


def _mixed_fwd(spec, a, b):
    return _mixed(spec, a, b), (a, b)


def _mixed_bwd(spec, res, ct):
    a, b = res
    sa, sb, so = _operands(spec)
    ct = ct.astype(a.dtype)
    da = jnp.einsum(f"{so},{sb}->{sa}", ct, b, preferred_element_type=F32).astype(a.dtype)
    db = jnp.einsum(f"{sa},{so}->{sb}", a, ct, preferred_element_type=F32).astype(b.dtype)
    return da, db


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def mixed_einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """einsum of a and b computed in `dtype`, float32 result.

    On the CPU with a reduced `dtype`: the custom-gradient path above. Elsewhere: a plain
    einsum in `dtype` with a float32 result (what XLA's accelerators do well)."""
    a, b = a.astype(dtype), b.astype(dtype)
    if use_mixed(dtype):
        _operands(spec)
        return _mixed(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """A `dot_general` for `nnx.Linear(dot_general=...)`: x[..., K] @ w[K, N].

    On the CPU with bf16 operands it returns float32 through the same custom-gradient
    product as `mixed_einsum`; otherwise it is `lax.dot_general` unchanged."""
    if not use_mixed(lhs.dtype):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim != 2:
        raise ValueError(f"mixed_dot_general handles x[..., K] @ w[K, N] only, got {dimension_numbers}")
    y = _mixed("mk,kn->mn", lhs.reshape(-1, lhs.shape[-1]), rhs)
    return y.reshape(*lhs.shape[:-1], rhs.shape[1])
