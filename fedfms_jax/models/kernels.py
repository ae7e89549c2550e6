"""Which program each backend gets, decided in one place.

`SamConfig.kernels` names a plan; the model resolves it once, when it is built, and every
module keeps the resolved `KernelPlan`. Nothing under models/ asks for the backend while
tracing, so the plan stored on a model says exactly which paths its programs take.

  "auto"       "cpu" when jax.default_backend() is the CPU, "gpu" otherwise (resolved at
               build time).
  "cpu"        XLA:CPU speed paths: cache-sized blockwise attention for large score
               matrices, bf16 products with float32 results and gradients
               (mixed_matmul), and a host-call barrier between the blocks of deep
               encoders (fusion_barrier).
  "gpu"        accelerators: attention through `jax.nn.dot_product_attention` with the
               relative positions folded into q and k (no bias tensor, see
               fused_attention), cuDNN's fused kernel on a CUDA backend (chosen at build
               time) and XLA's lowering elsewhere; plain products in the compute dtype
               with float32 results; no host calls, no fusion barrier.
  "reference"  the plain SAM math: every head's scores in one einsum, plain products,
               no barrier.

All plans compute the same function: in float32 they agree to rounding (tests/models/
test_kernels.py); in bfloat16 they round at different places. Exact reformulations that
save work on every backend are shared by all plans, "reference" included: convolutions
as matmuls (common.MatmulConv2d, UpConv2x2), TinyViT's depthwise convolutions as
shifted sums (common.depthwise_conv2d) and windowed attention that projects and
answers only the real tokens (image_encoder.Attention.attend_windows).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp

from fedfms_jax.models import rel_pos_attention as rpa
from fedfms_jax.models.fused_attention import fused_rel_pos_attention
from fedfms_jax.models.mixed_matmul import linear_options, mixed_einsum

__all__ = ["KERNEL_NAMES", "KernelPlan", "PLANS", "resolve_kernels"]

KERNEL_NAMES = ("auto", "cpu", "gpu", "reference")
ATTENTION_IMPLS = ("reference", "cpu", "dot_product_attention")
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """The resolved choices.

    attention: "reference" (all scores in one einsum), "cpu" (that layout for small score
        tensors, the blockwise one above 32 MB of scores, see rel_pos_attention) or
        "dot_product_attention" (jax.nn.dot_product_attention with the relative
        positions folded into q and k, models/fused_attention).
    fused_impl: dot_product_attention's `implementation`: None (XLA's) or "cudnn".
    mixed_matmul: reduced-precision products through mixed_matmul's custom gradient
        (float32 compute is unaffected).
    barrier_min_depth: encoders with at least this many blocks put a cotangent barrier
        after each block; None: never.
    """

    name: str
    attention: str
    mixed_matmul: bool
    barrier_min_depth: Optional[int]
    fused_impl: Optional[str] = None

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")

    def barrier_between_blocks(self, depth: int) -> bool:
        return self.barrier_min_depth is not None and depth >= self.barrier_min_depth

    def einsum(self, spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
        """einsum of a and b with operands in `dtype` and a float32 result."""
        if self.mixed_matmul:
            return mixed_einsum(spec, a, b, dtype)
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=F32)

    def linear_options(self, dtype) -> dict:
        """`nnx.Linear` keyword arguments for a layer computing in `dtype`."""
        return linear_options(dtype) if self.mixed_matmul else dict(dtype=dtype)

    def attend(self, q, k, v, rh, rw, scale: float) -> jax.Array:
        """Attention with SAM's decomposed relative positions, heads last (BTNH).

        q [B, qh*qw, heads, hd], the queries of the top-left qh x qw corner of the key
        grid; k, v [B, H*W, heads, hd]; rh [qh, H, hd], rw [qw, W, hd] (get_rel_pos rows)
        -> [B, qh*qw, heads, hd]."""
        if self.attention == "dot_product_attention":
            return fused_rel_pos_attention(q, k, v, rh, rw, scale, self.fused_impl)
        heads_first = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads_first(q), heads_first(k), heads_first(v)
        if self.attention == "cpu":
            impl = rpa.cpu_layout(q.shape, k.shape[2])
        else:
            impl = "full"
        return heads_first(rpa.rel_pos_attention(q, k, v, rh, rw, scale, impl, mixed=self.mixed_matmul))


PLANS = {
    # XLA:CPU re-fuses the backward residual chain into every weight gradient, a cost
    # that grows with depth squared (fusion_barrier). Shallow (test) encoders skip the
    # barrier, and with it the host call that keeps JAX from caching their programs on
    # disk; ViT-B (12 blocks) and up take it.
    "cpu": KernelPlan("cpu", attention="cpu", mixed_matmul=True, barrier_min_depth=8),
    "gpu": KernelPlan("gpu", attention="dot_product_attention", mixed_matmul=False, barrier_min_depth=None),
    # The gpu plan on a CUDA backend: cuDNN's fused attention where it takes the call.
    "gpu_cudnn": KernelPlan("gpu", attention="dot_product_attention", mixed_matmul=False,
                            barrier_min_depth=None, fused_impl="cudnn"),
    "reference": KernelPlan("reference", attention="reference", mixed_matmul=False, barrier_min_depth=None),
}


def resolve_kernels(kernels: Union[str, KernelPlan] = "auto") -> KernelPlan:
    """The plan for a `SamConfig.kernels` name ("auto" asks the default backend now);
    a plan is returned as it is."""
    if isinstance(kernels, KernelPlan):
        return kernels
    if kernels == "auto":
        kernels = "cpu" if jax.default_backend() == "cpu" else "gpu"
    if kernels not in KERNEL_NAMES:
        raise ValueError(f"kernels={kernels!r} is not one of {KERNEL_NAMES}")
    if kernels == "gpu" and _on_cuda():
        return PLANS["gpu_cudnn"]
    return PLANS[kernels]


@functools.lru_cache(maxsize=None)
def _on_cuda() -> bool:
    """Whether the default backend is an NVIDIA GPU (cuDNN's fused attention exists)."""
    if jax.default_backend() != "gpu":
        return False
    return "rocm" not in jax.devices()[0].client.platform_version.lower()
