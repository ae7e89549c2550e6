"""SAM's relative-position attention through `jax.nn.dot_product_attention` (the "gpu" plan).

The decomposed relative positions (rel_h from the query rows, rel_w from the columns)
become the call's additive bias, so the backend's attention lowering sees one ordinary
attention: XLA's composition wherever it runs (this also lowers on a CPU), and a fused
kernel where XLA or a later `implementation="cudnn"` provides one. The bias is kept in
float32: cuDNN would want it in the operands' dtype, a choice for the CUDA path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["fused_rel_pos_attention"]

F32 = jnp.float32


def fused_rel_pos_attention(q, k, v, rh, rw, scale: float) -> jax.Array:
    """q [B, qh*qw, heads, hd]; k, v [B, H*W, heads, hd] (BTNH, what
    dot_product_attention takes); rh [qh, H, hd], rw [qw, W, hd] -> [B, qh*qw, heads, hd]."""
    B, n, nh, hd = q.shape
    (qh, H), (qw, W) = rh.shape[:2], rw.shape[:2]
    if n != qh * qw or k.shape[1] != H * W:
        raise ValueError(f"token counts q {q.shape}, k {k.shape} do not match the rel-pos "
                         f"grids {rh.shape[:2]} x {rw.shape[:2]}")
    # Decomposed relative positions use the unscaled q, as the official code does.
    rq = q.reshape(B, qh, qw, nh, hd)
    rel_h = jnp.einsum("bxyhd,xkd->bhxyk", rq, rh.astype(q.dtype), preferred_element_type=F32)
    rel_w = jnp.einsum("bxyhd,ykd->bhxyk", rq, rw.astype(q.dtype), preferred_element_type=F32)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, n, H * W)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale)
