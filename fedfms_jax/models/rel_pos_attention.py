"""Multi-head attention with SAM's decomposed relative positions, two exact layouts.

`full`: every head's [N, N] score matrix at once (what XLA fuses well on accelerators;
805 MB per image for a ViT-B global block at 1024 input).

`blockwise`: one head at a time and, for large grids, a few query rows at a time, so
each score block stays in the CPU cache (<= 8 MB) instead of streaming the full matrix
through memory several times. The softmax normalisation is applied after the value
product (divide [n, head_dim] instead of [n, N]); the maximum subtracted for stability
cancels exactly, so its gradient is stopped. On a 2-core CPU this runs the ViT-B global
attention at 1024 about 3x faster than `full` (BENCHMARKS.md).

`auto` picks `blockwise` on CPU when the full scores would exceed 32 MB (e.g. every
ViT-B block at 1024 input) and `full` otherwise: small score tensors already fit the
cache, their sequential steps would only add loop overhead, and the backward pass of
the sequential loop is slower than the fused one at training sizes such as 256.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedfms_jax.models.mixed_matmul import mixed_einsum

__all__ = ["rel_pos_attention"]

_SCORE_BLOCK_ELEMENTS = 1 << 21  # 8 MB of float32 scores per sequential step
_FULL_MAX_ELEMENTS = 1 << 23  # 32 MB of float32 scores for all heads of a call
F32 = jnp.float32


def _rows_per_block(H: int, W: int) -> int:
    """Largest divisor of H whose query rows x all keys fit the score-block budget."""
    rows = H
    while rows > 1 and (H % rows or rows * W * H * W > _SCORE_BLOCK_ELEMENTS):
        rows -= 1
    return rows


def _full(q, k, v, rh, rw, H, W, scale):
    """q, k, v [B, heads, N, hd]; rh [H, H, hd], rw [W, W, hd] -> [B, heads, N, hd]."""
    B, nh, N, hd = q.shape
    logits = mixed_einsum("bhnd,bhmd->bhnm", q * scale, k, q.dtype)
    # (The small rel-pos products keep plain einsums: XLA:CPU has no bf16 x bf16 -> f32
    # kernel for their batched gradients.)
    # Decomposed relative positions use the unscaled q, as the official code does.
    rq = q.reshape(B, nh, H, W, hd)
    rel_h = jnp.einsum("bhxyd,xkd->bhxyk", rq, rh, preferred_element_type=F32)
    rel_w = jnp.einsum("bhxyd,ykd->bhxyk", rq, rw, preferred_element_type=F32)
    logits = logits.reshape(B, nh, H, W, H, W) + rel_h[..., :, None] + rel_w[..., None, :]
    probs = jax.nn.softmax(logits.reshape(B, nh, N, N), axis=-1).astype(v.dtype)
    return mixed_einsum("bhnm,bhmd->bhnd", probs, v, v.dtype).astype(v.dtype)


def _score_block(q, k, v, rh_rows, rw, W, scale):
    """Attention of `rows` whole query rows (q [rows*W, hd]) against all keys [N, hd]."""
    rows = rh_rows.shape[0]
    N, hd = k.shape
    s = mixed_einsum("nd,md->nm", q * scale, k, q.dtype)
    rq = q.reshape(rows, W, hd)
    rel_h = jnp.einsum("xyd,xkd->xyk", rq, rh_rows, preferred_element_type=F32)
    rel_w = jnp.einsum("xyd,ykd->xyk", rq, rw, preferred_element_type=F32)
    s = s.reshape(rows, W, N // W, W) + rel_h[..., :, None] + rel_w[..., None, :]
    s = s.reshape(rows * W, N)
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True)))
    out = mixed_einsum("nm,md->nd", e, v, v.dtype)
    return (out / e.sum(axis=-1, keepdims=True)).astype(v.dtype)


def _blockwise(q, k, v, rh, rw, H, W, scale):
    B, nh, N, hd = q.shape
    rows = _rows_per_block(H, W)
    n_blocks = H // rows

    def one_head(qkv):
        qh, kh, vh = qkv
        if n_blocks == 1:
            return _score_block(qh, kh, vh, rh, rw, W, scale)
        blocks = (qh.reshape(n_blocks, rows * W, hd), rh.reshape(n_blocks, rows, H, hd))
        out = jax.lax.map(lambda b: _score_block(b[0], kh, vh, b[1], rw, W, scale), blocks)
        return out.reshape(N, hd)

    flat = lambda t: t.reshape(B * nh, N, hd)  # noqa: E731
    return jax.lax.map(one_head, (flat(q), flat(k), flat(v))).reshape(B, nh, N, hd)


def rel_pos_attention(q, k, v, rh, rw, hw: tuple[int, int], scale: float, impl: str = "auto"):
    """Softmax(q k^T * scale + rel_h + rel_w) v over an H x W token grid.

    q, k, v: [B, heads, H*W, head_dim]; rh [H, H, hd] and rw [W, W, hd] from
    `get_rel_pos`. Scores, softmax and the value accumulation run in float32.
    """
    H, W = hw
    if impl == "auto":
        cpu = jax.default_backend() == "cpu"
        B, nh, N, _ = q.shape
        impl = "blockwise" if cpu and B * nh * N * N > _FULL_MAX_ELEMENTS else "full"
    if impl == "blockwise":
        return _blockwise(q, k, v, rh, rw, H, W, scale)
    if impl == "full":
        return _full(q, k, v, rh, rw, H, W, scale)
    raise ValueError(f"unknown attention impl {impl!r}: use 'auto', 'blockwise' or 'full'")
