"""SAM's relative-position attention as one plain `jax.nn.dot_product_attention` call
(the "gpu" plan), with the relative positions folded into the product: no bias tensor.

SAM's scores are  (scale * q) . k_j + rel_h[q, row(j)] + rel_w[q, col(j)],  where rel_h and
rel_w are products of the unscaled q with the get_rel_pos tables. That term has rank at
most H + W, so with

    q' = [scale * q, rel_h(q), rel_w(q), 0...]      k' = [k, onehot(row(j)), onehot(col(j)), 0...]

q' . k'_j is exactly the score above. The call then takes scale=1.0 (q is already scaled;
the rel-pos parts must stay unscaled, as in the official code, and 1/sqrt(hd) = 1/8 is a
power of two for ViT-B, so scaling q in bf16 rounds nothing). Head dims: ViT-B global
blocks at 1024 (64x64 grid) 64 + 64 + 64 = 192; windowed blocks 64 + 14 + 14 = 92, zero
columns up to 96. `jax.nn.dot_product_attention` wants value's head dim equal to the
key's, so v is zero-padded to it and the extra output columns dropped.

Why no bias: a [B, heads, N, N] bias is what a fused kernel (cuDNN flash attention) must
read from memory for every score (805 MB per image per ViT-B global block at 1024 in
float32) and, to train rel_pos, write its gradient back; the folded form keeps scores on
chip. Constraints that kernel has (checked statically by tests/models/test_gpu_lowering.py,
since cuDNN cannot be lowered without a GPU): bf16/fp16 operands, head dim a multiple of 8
and <= 256, BTNH layout, no bias.

`implementation="cudnn"` (the gpu plan on a CUDA backend, see kernels.resolve_kernels)
asks for cuDNN's fused kernel; a call cuDNN refuses at trace time (fp32 compute, a head
dim over 256, no cuDNN) takes XLA's composition instead, with one warning per reason.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

__all__ = ["fused_rel_pos_attention", "folded_head_dim", "fold_rel_pos", "cudnn_accepts"]

F32 = jnp.float32
HEAD_DIM_MULTIPLE = 8
CUDNN_MAX_HEAD_DIM = 256
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_warned: set[str] = set()


def folded_head_dim(hd: int, H: int, W: int) -> int:
    """Head dim of q'/k' (hd + H + W rounded up to a multiple of 8)."""
    return -(-(hd + H + W) // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE


def cudnn_accepts(dtype, head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes operands of this dtype and head dim."""
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] and \
        head_dim % HEAD_DIM_MULTIPLE == 0 and head_dim <= CUDNN_MAX_HEAD_DIM


def fold_rel_pos(q, k, v, rh, rw, scale: float):
    """(q', k', v') of the module docstring, all in q's dtype, head dim folded_head_dim.

    q [B, qh*qw, heads, hd]; k, v [B, H*W, heads, hd]; rh [qh, H, hd], rw [qw, W, hd]."""
    B, n, nh, hd = q.shape
    (qh, H), (qw, W) = rh.shape[:2], rw.shape[:2]
    if n != qh * qw or k.shape[1] != H * W:
        raise ValueError(f"token counts q {q.shape}, k {k.shape} do not match the rel-pos "
                         f"grids {rh.shape[:2]} x {rw.shape[:2]}")
    dt = q.dtype
    D = folded_head_dim(hd, H, W)
    pad = D - (hd + H + W)
    # Decomposed relative positions use the unscaled q, as the official code does.
    rq = q.reshape(B, qh, qw, nh, hd)
    rel_h = jnp.einsum("bxyhd,xkd->bxyhk", rq, rh.astype(dt), preferred_element_type=F32)
    rel_w = jnp.einsum("bxyhd,ykd->bxyhk", rq, rw.astype(dt), preferred_element_type=F32)
    q_parts = [(q * jnp.asarray(scale, dt)).reshape(B, qh, qw, nh, hd),
               rel_h.astype(dt), rel_w.astype(dt)]
    if pad:
        q_parts.append(jnp.zeros((B, qh, qw, nh, pad), dt))
    q2 = jnp.concatenate(q_parts, axis=-1).reshape(B, n, nh, D)
    # Key j = (row r, col c): one-hot of r over H and of c over W, the same for every head.
    rows = jnp.repeat(jnp.eye(H, dtype=dt), W, axis=0)  # [H*W, H]
    cols = jnp.tile(jnp.eye(W, dtype=dt), (H, 1))  # [H*W, W]
    onehots = jnp.concatenate([rows, cols] + ([jnp.zeros((H * W, pad), dt)] if pad else []), axis=-1)
    onehots = jnp.broadcast_to(onehots[None, :, None, :], (B, H * W, nh, D - hd))
    k2 = jnp.concatenate([k.astype(dt), onehots], axis=-1)
    v2 = jnp.concatenate([v.astype(dt), jnp.zeros((B, H * W, nh, D - hd), dt)], axis=-1)
    return q2, k2, v2


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logging.getLogger(__name__).warning("cuDNN attention not used, XLA's instead: %s", reason)


def fused_rel_pos_attention(q, k, v, rh, rw, scale: float, implementation: str | None = None) -> jax.Array:
    """q [B, qh*qw, heads, hd]; k, v [B, H*W, heads, hd] (BTNH, what
    dot_product_attention takes); rh [qh, H, hd], rw [qw, W, hd] -> [B, qh*qw, heads, hd].

    implementation: None (XLA's composition) or "cudnn" (cuDNN's fused kernel where it
    accepts the call)."""
    hd = q.shape[-1]
    q2, k2, v2 = fold_rel_pos(q, k, v, rh, rw, scale)
    if implementation == "cudnn":
        if cudnn_accepts(q2.dtype, q2.shape[-1]):
            try:
                out = jax.nn.dot_product_attention(q2, k2, v2, scale=1.0, implementation="cudnn")
                return out[..., :hd]
            except (NotImplementedError, RuntimeError, ValueError) as exc:  # refused while tracing
                _warn_once(" ".join(str(exc).split())[:200])
        else:
            _warn_once(f"{q2.dtype} operands, head dim {q2.shape[-1]}")
    return jax.nn.dot_product_attention(q2, k2, v2, scale=1.0)[..., :hd]
