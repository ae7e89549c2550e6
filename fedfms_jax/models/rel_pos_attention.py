"""Multi-head attention with SAM's decomposed relative positions, two exact einsum layouts.

`full`: every head's [N, N] score matrix at once, the plain SAM math (805 MB per image
for a ViT-B global block at 1024 input).

`blockwise`: one head at a time and, for large grids, a few query rows at a time, so
each score block stays in the CPU cache (<= 8 MB) instead of streaming the full matrix
through memory several times. The softmax normalisation is applied after the value
product (divide [n, head_dim] instead of [n, N]); the maximum subtracted for stability
cancels exactly, so its gradient is stopped. On a 2-core CPU this runs the ViT-B global
attention at 1024 about 3x faster than `full` (BENCHMARKS.md).

Queries may cover only the top-left `qh x qw` corner of the `H x W` key grid (the real
tokens of a padded edge window, whose padded queries would be discarded): the rel-pos
tables then hold those query rows only, `rh [qh, H, hd]`, `rw [qw, W, hd]`.

`cpu_layout` is the "cpu" kernel plan's choice (models/kernels): `blockwise` when the
full scores would exceed 32 MB (e.g. every ViT-B block at 1024 input) and `full`
otherwise: small score tensors already fit the cache, their sequential steps would only
add loop overhead, and the backward pass of the sequential loop is slower than the fused
one at training sizes such as 256.

With `mixed`, the two large products (scores and values) go through mixed_matmul's
custom gradient (it only differs from a plain product for reduced dtypes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedfms_jax.models.mixed_matmul import mixed_einsum

__all__ = ["rel_pos_attention", "cpu_layout"]

_SCORE_BLOCK_ELEMENTS = 1 << 21  # 8 MB of float32 scores per sequential step
_FULL_MAX_ELEMENTS = 1 << 23  # 32 MB of float32 scores for all heads of a call
F32 = jnp.float32


def _rows_per_block(qh: int, qw: int, N: int) -> int:
    """Largest divisor of qh whose query rows (qw each) x N keys fit the score-block budget."""
    rows = qh
    while rows > 1 and (qh % rows or rows * qw * N > _SCORE_BLOCK_ELEMENTS):
        rows -= 1
    return rows


def _product(mixed: bool):
    """einsum(spec, a, b) with operands in `dtype`, float32 result: mixed or plain."""
    if mixed:
        return mixed_einsum
    return lambda spec, a, b, dtype: jnp.einsum(spec, a.astype(dtype), b.astype(dtype),  # noqa: E731
                                                preferred_element_type=F32)


def cpu_layout(q_shape: tuple[int, ...], n_keys: int) -> str:
    """`blockwise` when a call's float32 scores (q [B, heads, n, hd] x n_keys) outgrow the
    CPU cache budget, else `full`."""
    B, nh, n, _ = q_shape
    return "blockwise" if B * nh * n * n_keys > _FULL_MAX_ELEMENTS else "full"


def _full(q, k, v, rh, rw, scale, product):
    """q [B, heads, qh*qw, hd]; k, v [B, heads, H*W, hd]; rh [qh, H, hd], rw [qw, W, hd]
    -> [B, heads, qh*qw, hd]."""
    B, nh, n, hd = q.shape
    (qh, H), (qw, W) = rh.shape[:2], rw.shape[:2]
    logits = product("bhnd,bhmd->bhnm", q * scale, k, q.dtype)
    # (The small rel-pos products keep plain einsums: XLA:CPU has no bf16 x bf16 -> f32
    # kernel for their batched gradients.)
    # Decomposed relative positions use the unscaled q, as the official code does.
    rq = q.reshape(B, nh, qh, qw, hd)
    rel_h = jnp.einsum("bhxyd,xkd->bhxyk", rq, rh, preferred_element_type=F32)
    rel_w = jnp.einsum("bhxyd,ykd->bhxyk", rq, rw, preferred_element_type=F32)
    logits = logits.reshape(B, nh, qh, qw, H, W) + rel_h[..., :, None] + rel_w[..., None, :]
    probs = jax.nn.softmax(logits.reshape(B, nh, n, H * W), axis=-1).astype(v.dtype)
    return product("bhnm,bhmd->bhnd", probs, v, v.dtype).astype(v.dtype)


def _score_block(q, k, v, rh_rows, rw, scale, product):
    """Attention of `rows` whole query rows (q [rows*qw, hd]) against all keys [H*W, hd]."""
    (rows, H), (qw, W) = rh_rows.shape[:2], rw.shape[:2]
    hd = k.shape[-1]
    s = product("nd,md->nm", q * scale, k, q.dtype)
    rq = q.reshape(rows, qw, hd)
    rel_h = jnp.einsum("xyd,xkd->xyk", rq, rh_rows, preferred_element_type=F32)
    rel_w = jnp.einsum("xyd,ykd->xyk", rq, rw, preferred_element_type=F32)
    s = s.reshape(rows, qw, H, W) + rel_h[..., :, None] + rel_w[..., None, :]
    s = s.reshape(rows * qw, H * W)
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True)))
    out = product("nm,md->nd", e, v, v.dtype)
    return (out / e.sum(axis=-1, keepdims=True)).astype(v.dtype)


def _blockwise(q, k, v, rh, rw, scale, product):
    B, nh, n, hd = q.shape
    N = k.shape[2]
    (qh, H), qw = rh.shape[:2], rw.shape[0]
    rows = _rows_per_block(qh, qw, N)
    n_blocks = qh // rows

    def one_head(head):
        qi, ki, vi = head
        if n_blocks == 1:
            return _score_block(qi, ki, vi, rh, rw, scale, product)
        blocks = (qi.reshape(n_blocks, rows * qw, hd), rh.reshape(n_blocks, rows, H, hd))
        out = jax.lax.map(lambda b: _score_block(b[0], ki, vi, b[1], rw, scale, product), blocks)
        return out.reshape(n, hd)

    flat = lambda t: t.reshape(B * nh, -1, hd)  # noqa: E731
    return jax.lax.map(one_head, (flat(q), flat(k), flat(v))).reshape(B, nh, n, hd)


def rel_pos_attention(q, k, v, rh, rw, scale: float, impl: str = "full", *, mixed: bool = False):
    """Softmax(q k^T * scale + rel_h + rel_w) v with keys on an H x W token grid.

    q: [B, heads, qh*qw, head_dim], the queries of the grid's top-left qh x qw corner;
    k, v: [B, heads, H*W, head_dim]; rh [qh, H, hd] and rw [qw, W, hd], the first rows of
    `get_rel_pos` tables. Scores, softmax and the value accumulation run in float32.
    impl: "full" or "blockwise"; mixed: the large products through mixed_matmul.
    """
    if q.shape[2] != rh.shape[0] * rw.shape[0] or k.shape[2] != rh.shape[1] * rw.shape[1]:
        raise ValueError(f"token counts q {q.shape}, k {k.shape} do not match the rel-pos "
                         f"grids {rh.shape[:2]} x {rw.shape[:2]}")
    if impl == "blockwise":
        return _blockwise(q, k, v, rh, rw, scale, _product(mixed))
    if impl == "full":
        return _full(q, k, v, rh, rw, scale, _product(mixed))
    raise ValueError(f"unknown attention impl {impl!r}: use 'full' or 'blockwise'")
