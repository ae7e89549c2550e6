"""Reduced-precision matmuls that stay on XLA:CPU's fast kernels, forward and backward.

On a CPU with bf16 matrix units (AMX), XLA:CPU runs a bf16 x bf16 product with a float32
result several times faster than float32 (measured here: 450-650 GFLOP/s against
110-150), but a product with a bf16 *result* falls back to a slow kernel (~110). Flax's
`Linear(dtype=bfloat16)` asks for bf16 results, and JAX's own transpose of a
float32-result product asks for bf16 gradients, so both directions miss the fast path.

`mixed_einsum` casts its operands to bf16 itself, returns float32, and has a backward
pass that casts the cotangent to bf16 once and again asks for float32 results. Because the
cast happens inside, a float32 master weight receives its gradient in float32 straight
from the product: no rounding to bf16 and widening back, two passes over every weight in
every step. Numerically this is ordinary mixed precision: operands rounded to bf16, sums
and gradients in float32.

The "cpu" kernel plan (models/kernels) uses these for bf16/fp16 compute; float32
compute takes the plain path, unchanged, and the other plans never come here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["mixed_einsum", "linear_options", "use_mixed"]

F32 = jnp.float32
LINEAR_SPEC = "mk,kn->mn"


def use_mixed(dtype) -> bool:
    """Whether products in `dtype` take the mixed path (reduced precision) or stay plain."""
    return jnp.dtype(dtype) != jnp.dtype(F32)


def _operands(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    a, b = inputs.split(",")
    if "." in spec or not set(a) <= set(b + out) or not set(b) <= set(a + out):
        # Each operand's gradient is then the einsum of the other two (no index of one
        # operand is summed away alone).
        raise ValueError(f"mixed_einsum supports two-operand specs without lone summed indices, got {spec!r}")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _mixed(spec: str, dtype, a_dtype, b_dtype, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=F32)


def _mixed_fwd(spec, dtype, a_dtype, b_dtype, a, b):
    a_low, b_low = a.astype(dtype), b.astype(dtype)
    return jnp.einsum(spec, a_low, b_low, preferred_element_type=F32), (a_low, b_low)


def _materialized_transpose(x: jax.Array) -> jax.Array:
    """x.T [K, M] of x [M, K] as a buffer of its own.

    XLA folds a plain transpose into the consuming product's dimension numbers, and
    XLA:CPU runs a reduced-precision product whose left operand contracts its leading
    axis upcast to float32 (a Linear's weight gradient: ~3.5x slower, measured at
    512 x 768 x 3072). Neither the barrier nor the reshape alone stops that folding;
    a 3-D reshape behind the barrier does."""
    m, k = x.shape
    return jax.lax.optimization_barrier(x.T.reshape(k, m, 1)).reshape(k, m)


def _mixed_bwd(spec, dtype, a_dtype, b_dtype, res, ct):
    a_low, b_low = res
    sa, sb, so = _operands(spec)
    ct = ct.astype(dtype)
    da = jnp.einsum(f"{so},{sb}->{sa}", ct, b_low, preferred_element_type=F32)
    if spec == LINEAR_SPEC:  # weight gradient x^T @ ct with x^T laid out for the fast kernel
        db = jnp.einsum("km,mn->kn", _materialized_transpose(a_low), ct, preferred_element_type=F32)
    else:
        db = jnp.einsum(f"{sa},{so}->{sb}", a_low, ct, preferred_element_type=F32)
    return da.astype(a_dtype), db.astype(b_dtype)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def _product(spec: str, dtype, a: jax.Array, b: jax.Array) -> jax.Array:
    # The operands' own dtypes ride along so each gradient comes back in its operand's.
    return _mixed(spec, dtype, a.dtype, b.dtype, a, b)


def mixed_einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """einsum of a and b computed in `dtype`, float32 result.

    With a reduced `dtype`: the custom-gradient path above. float32: a plain einsum."""
    if use_mixed(dtype):
        _operands(spec)
        return _product(spec, dtype, a, b)
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=F32)


def _unpromoted(arrays, dtype=None, **kwargs):
    """nnx.Linear's dtype promotion, skipped: the mixed product casts inside."""
    return arrays


def _mixed_dot_general(lhs, rhs, dimension_numbers, *, compute_dtype, **kwargs):
    """x[..., K] @ w[K, N] through the mixed product (Linear's other options are moot)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim != 2:
        raise ValueError(f"the mixed Linear handles x[..., K] @ w[K, N] only, got {dimension_numbers}")
    y = _product(LINEAR_SPEC, compute_dtype, lhs.reshape(-1, lhs.shape[-1]), rhs)
    return y.reshape(*lhs.shape[:-1], rhs.shape[1])


def linear_options(dtype) -> dict:
    """`nnx.Linear` keyword arguments for a layer computing in `dtype`.

    With a reduced dtype the layer keeps its float32 kernel, bias and input and
    multiplies through the mixed product (float32 result, float32 kernel gradient); in
    float32 it is Linear's own promotion to `dtype`."""
    if not use_mixed(dtype):
        return dict(dtype=dtype)
    return dict(dtype=dtype, promote_dtype=_unpromoted,
                dot_general=functools.partial(_mixed_dot_general, compute_dtype=dtype))
