"""FLOPs counted from a jitted function, and the device's peak FLOP/s for MFU.

The primary count is XLA's own cost analysis of the compiled step. XLA counts the body of
a while/scan loop once whatever its trip count, so it must be given a loop-free step (one
local step of one client). `jaxpr_flops` is the independent count, from the traced
program: matrix-multiply and convolution FLOPs, scans multiplied by their length.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

# Dense (no sparsity) datasheet peaks in TFLOP/s: (bf16 tensor-core, fp32 non-tensor).
# Matched in order against jax's device_kind, so more specific names come first.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),
    ("GH200", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L4", 121.0, 30.3),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),   # fp16 tensor cores; V100 has no bf16
    ("T4", 65.0, 8.1),       # fp16
)


def xla_cost(compiled) -> dict[str, float] | None:
    """XLA's cost analysis of a compiled executable, or None where the backend gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends raise instead of returning nothing
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or not cost.get("flops"):
        return None
    return {k: float(v) for k, v in cost.items()}


def xla_flops(fn: Callable, *args, **kwargs) -> float | None:
    """FLOPs XLA reports for `jax.jit(fn)(*args)` (compiles it; loops counted once)."""
    compiled = jax.jit(fn).lower(*args, **kwargs).compile()
    cost = xla_cost(compiled)
    return None if cost is None else cost["flops"]


def _dot_general_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs.shape) if i not in rhs_contract and i not in rhs_batch]
    return 2.0 * math.prod(lhs.shape) * math.prod(rhs_free)


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = math.prod(rhs.shape) / rhs.shape[out_feature_dim]
    return 2.0 * math.prod(out.shape) * per_output


def _sub_jaxprs(params: dict[str, Any]):
    for value in params.values():
        items = value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max((_count(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
        else:
            inner = sum(_count(j) for j in _sub_jaxprs(eqn.params))
            if name == "scan":
                inner *= eqn.params["length"]
            total += inner
    return total


def jaxpr_flops(fn: Callable, *args, **kwargs) -> float:
    """Matmul + convolution FLOPs of `fn(*args)` counted from its jaxpr (no compilation).

    Scans count length times; while loops (unknown trip count) count once.
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return _count(closed.jaxpr)


def table_peak_flops(device, dtype: str) -> float | None:
    """Datasheet dense peak FLOP/s of a known GPU for `dtype`, else None."""
    if device.platform != "gpu":
        return None
    kind = device.device_kind
    for name, bf16, fp32 in GPU_PEAK_TFLOPS:
        if name in kind:
            return (bf16 if dtype == "bfloat16" else fp32) * 1e12
    return None


def measured_matmul_flops(dtype: str, *, n: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of a large jitted square matmul on the default device."""
    device = jax.devices()[0]
    if n is None:
        n = 8192 if device.platform == "gpu" else 2048
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jdtype)
    b = jax.random.normal(key_b, (n, n), jdtype)
    reps = 8 if device.platform == "gpu" else 1

    @jax.jit
    def chain(a, b):
        # Several dependent products per call so launch overhead does not count. A
        # float32 result, as the model's products ask for (XLA:CPU's bf16-result kernel
        # is several times slower than its float32-result one).
        for _ in range(reps):
            a = (jnp.dot(a, b, preferred_element_type=jnp.float32) * 1e-2).astype(jdtype)
        return a

    chain(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * reps / best


def torch_matmul_flops(*, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best FLOP/s of a large fp32 torch matmul (the reference's ceiling)."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_peak(dtype: str, how: str = "auto") -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU: the table for known GPUs, else measured."""
    device = jax.devices()[0]
    if how in ("auto", "table"):
        peak = table_peak_flops(device, dtype)
        if peak is not None:
            return peak, f"datasheet {device.device_kind} {dtype} dense"
        if how == "table":
            raise ValueError(f"no table entry for {device.device_kind!r}")
    return measured_matmul_flops(dtype), f"measured {dtype} matmul on {device.device_kind}"


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
