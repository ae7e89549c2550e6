"""SAM ViT image encoder (segment_anything 1.0) with optional Medical SAM Adapters.

Attribute names mirror `segment_anything.modeling.image_encoder` (plus the MSA keys
`blocks.{i}.{Space,MLP,Depth}_Adapter`), so PyTorch checkpoints convert with the shared
rules in `weights_convert.rules`. Layout is NHWC; parameters are float32 and `dtype`
selects the compute dtype (softmax and LayerNorm statistics stay float32). `kernels`
(models/kernels) picks how attention and products are computed on each backend; the
function is the same.

Positional helpers (`resize_pos_embed`, `resize_rel_pos`, `get_rel_pos`) reproduce
PyTorch's `F.interpolate` (bicubic / linear, align_corners=False) and the official
`get_rel_pos`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.models.adapters import Adapter
from fedfms_jax.models.common import LayerNorm2d, MatmulConv2d, gelu
from fedfms_jax.models.fusion_barrier import cotangent_barrier
from fedfms_jax.models.kernels import KernelPlan, resolve_kernels

__all__ = [
    "ViTConfig",
    "VIT_CONFIGS",
    "ImageEncoderViT",
    "get_rel_pos",
    "resize_pos_embed",
    "resize_rel_pos",
    "closest_numbers",
]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    out_chans: int = 256
    mlp_ratio: float = 4.0


VIT_CONFIGS = {
    "vit_b": ViTConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ViTConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ViTConfig(1280, 32, 16, (7, 15, 23, 31)),
    # Test variant: at img_size 160 the 10x10 grid pads to 12x12 windows of 4.
    "vit_tiny": ViTConfig(64, 4, 2, (1, 3), window_size=4, out_chans=32),
}

MSA_MLP_SCALE = 0.5  # x + mlp(xn) + 0.5 * MLP_Adapter(xn), as in the MSA original


# ----------------------------------------------------------------------------------------
# Positional-embedding resizing, exactly as PyTorch's F.interpolate(align_corners=False).
# Index/weight tables depend only on static sizes: built once in numpy (float64).


def _source_index(in_len: int, out_len: int, clamp: bool) -> np.ndarray:
    """Source coordinate of each output sample, computed in float32 as PyTorch's CPU
    kernels do (scale = in/out, src = scale * (dst + 0.5) - 0.5), so weights match."""
    f = np.float32
    scale = f(in_len) / f(out_len)
    src = scale * (np.arange(out_len, dtype=f) + f(0.5)) - f(0.5)
    return np.maximum(src, f(0)) if clamp else src


@functools.lru_cache(maxsize=None)
def _linear_matrix(in_len: int, out_len: int) -> np.ndarray:
    """[out_len, in_len] weights of F.interpolate(mode='linear', align_corners=False)."""
    m = np.zeros((out_len, in_len), np.float64)
    for i, src in enumerate(_source_index(in_len, out_len, clamp=True)):
        i0 = int(np.floor(src))
        lam = src - np.float32(i0)
        m[i, i0] += np.float32(1) - lam
        m[i, min(i0 + 1, in_len - 1)] += lam
    return m


@functools.lru_cache(maxsize=None)
def _bicubic_matrix(in_len: int, out_len: int) -> np.ndarray:
    """[out_len, in_len] weights of F.interpolate(mode='bicubic', align_corners=False):
    Keys cubic with A=-0.75, source index not clamped, taps clamped to the border."""
    f = np.float32
    A = f(-0.75)

    def near(t):  # |t| <= 1
        return ((A + f(2)) * t - (A + f(3))) * t * t + f(1)

    def far(t):  # 1 < |t| < 2
        return ((A * t - f(5) * A) * t + f(8) * A) * t - f(4) * A

    m = np.zeros((out_len, in_len), np.float64)
    for i, src in enumerate(_source_index(in_len, out_len, clamp=False)):
        i0 = int(np.floor(src))
        t = src - f(i0)
        taps = (far(t + f(1)), near(t), near(f(1) - t), far(f(2) - t))
        for off, wgt in zip((-1, 0, 1, 2), taps):
            m[i, min(max(i0 + off, 0), in_len - 1)] += wgt
    return m


def resize_pos_embed(pos_embed: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """Absolute pos-embed [1, h, w, D] -> [1, new_h, new_w, D], bicubic as in
    F.interpolate(pos.permute(0, 3, 1, 2), size=new_hw, mode='bicubic', align_corners=False)."""
    pos = np.asarray(pos_embed)
    _, h, w, _ = pos.shape
    if (h, w) == tuple(new_hw):
        return pos
    mh, mw = _bicubic_matrix(h, new_hw[0]), _bicubic_matrix(w, new_hw[1])
    out = np.einsum("Hh,bhwc,Ww->bHWc", mh, pos.astype(np.float64), mw)
    return out.astype(pos.dtype)


def resize_rel_pos(rel_pos: np.ndarray, new_len: int) -> np.ndarray:
    """Relative pos table [L, C] -> [new_len, C], linear as the official get_rel_pos."""
    rel = np.asarray(rel_pos)
    if rel.shape[0] == new_len:
        return rel
    return (_linear_matrix(rel.shape[0], new_len) @ rel.astype(np.float64)).astype(rel.dtype)


@functools.lru_cache(maxsize=None)
def _rel_pos_index(q_size: int, k_size: int) -> np.ndarray:
    """Index into the resized table for each (query, key) pair, as the official code."""
    q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel.astype(np.int64)  # truncation, like torch's .long()


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative embeddings [q_size, k_size, C] for one axis (official get_rel_pos).

    A table whose length is not 2*max(q, k)-1 (e.g. sized for 1024 input and run at
    another size) is linearly interpolated at run time, as the official code does."""
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        m = jnp.asarray(_linear_matrix(rel_pos.shape[0], max_rel_dist), rel_pos.dtype)
        rel_pos = jnp.matmul(m, rel_pos, precision=jax.lax.Precision.HIGHEST)
    return rel_pos[_rel_pos_index(q_size, k_size)]


def closest_numbers(n: int) -> tuple[int, int]:
    """The MSA original's factorisation of the depth chunk into a (dh, dw) grid.

    Not the most square factorisation (4 -> (1, 4)); kept as is for parity."""
    a, b = int(n**0.5), int(n**0.5) + 1
    while a * b != n:
        if a * b < n:
            b += 1
        else:
            a -= 1
    return a, b


def _window_partition(x: jax.Array, ws: int) -> jax.Array:
    """[B, Hp, Wp, C] (already padded) -> [B * nh * nw, ws, ws, C], windows row-major."""
    B, Hp, Wp, C = x.shape
    x = x.reshape(B, Hp // ws, ws, Wp // ws, ws, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, C)


def _window_unpartition(w: jax.Array, hw_padded: tuple[int, int], hw: tuple[int, int]) -> jax.Array:
    """Inverse of `_window_partition` (windows [.., wh, ww, C], row-major), cropping the
    padding: -> [B, H, W, C]."""
    Hp, Wp = hw_padded
    wh, ww = w.shape[1:3]
    B = w.shape[0] // ((Hp // wh) * (Wp // ww))
    x = w.reshape(B, Hp // wh, Wp // ww, wh, ww, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, -1)[:, : hw[0], : hw[1]]


def _pad_tokens(x: jax.Array, hw_padded: tuple[int, int], value: jax.Array) -> jax.Array:
    """Pad [B, H, W, C] at the bottom/right to hw_padded with the per-channel vector `value`."""
    B, H, W, C = x.shape
    if (H, W) == tuple(hw_padded):
        return x
    full = jnp.broadcast_to(value.astype(x.dtype), (B, *hw_padded, C))
    return jax.lax.dynamic_update_slice(full, x, (0, 0, 0, 0))


class MLPBlock(nnx.Module):
    def __init__(self, dim: int, mlp_dim: int, *, dtype, kernels: KernelPlan, rngs: nnx.Rngs):
        kw = dict(param_dtype=jnp.float32, rngs=rngs, **kernels.linear_options(dtype))
        self.lin1 = nnx.Linear(dim, mlp_dim, **kw)
        self.lin2 = nnx.Linear(mlp_dim, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(gelu(self.lin1(x)))


class Attention(nnx.Module):
    """Multi-head attention with decomposed relative positions (MViTv2 / SAM)."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int], *, dtype,
                 kernels: KernelPlan | str = "auto", rngs):
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.kernels = resolve_kernels(kernels)
        kw = dict(param_dtype=jnp.float32, rngs=rngs, **self.kernels.linear_options(dtype))
        self.qkv = nnx.Linear(dim, 3 * dim, **kw)
        self.proj = nnx.Linear(dim, dim, **kw)
        self.dtype = dtype
        self.rel_pos_h = nnx.Param(jnp.zeros((2 * input_size[0] - 1, head_dim), jnp.float32))
        self.rel_pos_w = nnx.Param(jnp.zeros((2 * input_size[1] - 1, head_dim), jnp.float32))

    def attend(self, qkv: jax.Array, query_hw: tuple[int, int] | None = None) -> jax.Array:
        """Projected qkv [B, H, W, 3*dim] -> attention output before `proj`.

        query_hw (qh, qw): answer only the queries of the top-left qh x qw corner (all
        H x W tokens stay keys) -> [B, qh, qw, dim]; default all, [B, H, W, dim]."""
        B, H, W, three_dim = qkv.shape
        qh, qw = query_hw or (H, W)
        nh = self.num_heads
        hd = three_dim // 3 // nh
        qkv = qkv.astype(self.dtype)  # float32 when the projection took the mixed path
        # A split, not an index into a [.., 3, heads, hd] view: its gradient is one
        # concatenate, where the indexed view's is three padded copies summed with every
        # element evaluating all three (a ViT-B block trains 5-7 % faster on a CPU).
        q, k, v = jnp.split(qkv, 3, axis=-1)
        heads = lambda t: t.reshape(B, -1, nh, hd)  # noqa: E731  [B, tokens, heads, hd]
        rh = get_rel_pos(H, H, self.rel_pos_h[...])[:qh].astype(q.dtype)  # [qh, H, hd]
        rw = get_rel_pos(W, W, self.rel_pos_w[...])[:qw].astype(q.dtype)  # [qw, W, hd]
        out = self.kernels.attend(heads(q[:, :qh, :qw]), heads(k), heads(v), rh, rw, self.scale)
        return out.reshape(B, qh, qw, nh * hd)

    def attend_windows(self, qkv: jax.Array, ws: int, hw: tuple[int, int]) -> jax.Array:
        """Windowed attention of the real tokens: qkv [B, Hp, Wp, 3*dim], padded to whole
        ws x ws windows -> [B, H, W, dim], hw = (H, W) the unpadded grid.

        The padded queries' outputs are cropped away, so only real queries are answered:
        edge windows ask for their real rows/columns (a top-left corner of the window),
        grouped into at most four bands of equal shape. At 256 input (16x16 grid in four
        14x14 windows) that is 256 query rows instead of 784, the same function."""
        B, Hp, Wp, C3 = qkv.shape
        windows = _window_partition(qkv, ws).reshape(B, Hp // ws, Wp // ws, ws, ws, C3)

        def bands(n: int) -> list[tuple[slice, int]]:
            """(window indices, real tokens per window) of the whole and the edge windows."""
            whole, rest = divmod(n, ws)
            out = [(slice(0, whole), ws)] if whole else []
            return out + [(slice(whole, whole + 1), rest)] if rest else out

        def region(rows: slice, qh: int, cols: slice, qw: int) -> jax.Array:
            w = windows[:, rows, cols]
            nr, nc = w.shape[1:3]
            out = self.attend(w.reshape(-1, ws, ws, C3), (qh, qw))  # [B*nr*nc, qh, qw, C]
            return _window_unpartition(out, (nr * qh, nc * qw), (nr * qh, nc * qw))

        return jnp.concatenate([
            jnp.concatenate([region(r, qh, c, qw) for c, qw in bands(hw[1])], axis=2)
            for r, qh in bands(hw[0])
        ], axis=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(self.attend(self.qkv(x)))


class Block(nnx.Module):
    """SAM transformer block; with `adapters`, the Medical SAM Adapter block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        input_size: tuple[int, int],
        *,
        adapters: bool,
        adapter_zero_init: bool,
        pad_before_norm1: bool,
        dtype,
        kernels: KernelPlan,
        rngs: nnx.Rngs,
    ):
        ln = dict(epsilon=1e-6, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32)
        self.norm1 = nnx.LayerNorm(dim, **ln, rngs=rngs)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, attn_size, dtype=dtype, kernels=kernels, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, **ln, rngs=rngs)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), dtype=dtype, kernels=kernels, rngs=rngs)
        self.window_size = window_size
        self.adapters = adapters
        self.pad_before_norm1 = pad_before_norm1
        if adapters:
            kw = dict(zero_init=adapter_zero_init, dtype=dtype, kernels=kernels, rngs=rngs)
            self.MLP_Adapter = Adapter(dim, skip_connect=False, **kw)
            self.Space_Adapter = Adapter(dim, **kw)
            self.Depth_Adapter = Adapter(dim, skip_connect=False, **kw)

    def _depth_branch(self, xp: jax.Array, depth: int) -> jax.Array:
        """MSA 3-D branch on normalised tokens [N, h, w, C] (N = slices, or slice-windows).

        Groups `depth` consecutive entries of the leading axis, as the original's
        rearrange '(b d) h w c -> (b h w) d c' does. For windowed blocks that axis is
        (slice, window), so a group spans consecutive windows: the original's behaviour,
        reproduced for parity. Each token position attends over its group laid out as
        a closest_numbers(depth) grid, with the block's own attention module.
        """
        N, h, w, C = xp.shape
        if N % depth:
            raise ValueError(f"{N} slices/windows do not split into chunks of depth {depth}")
        dh, dw = closest_numbers(depth)
        xd = xp.reshape(N // depth, depth, h * w, C).transpose(0, 2, 1, 3)
        xd = self.Depth_Adapter(self.attn(xd.reshape(-1, dh, dw, C)))
        xd = xd.reshape(N // depth, h * w, depth, C).transpose(0, 2, 1, 3)
        return xd.reshape(N, h, w, C)

    def _attention_residual(self, x: jax.Array, depth_chunk: int | None) -> jax.Array:
        """Everything added to the shortcut before norm2: attention (+ adapters)."""
        xn = self.norm1(x)
        ws = self.window_size
        if ws == 0:
            out = self.attn(xn)
            if self.adapters:
                out = self.Space_Adapter(out)
            if depth_chunk:
                out = out + self._depth_branch(xn, depth_chunk)
            return out

        B, H, W, C = x.shape
        hw_p = (-(-H // ws) * ws, -(-W // ws) * ws)
        # Value of a padded token after norm1. Official SAM pads the normalised tokens
        # with zeros; the MSA/FedFMS original partitions before norm1, so its padded
        # tokens are LayerNorm(0) = norm1.bias.
        if self.pad_before_norm1:
            pad_xn = self.norm1.bias[...].astype(xn.dtype)
        else:
            pad_xn = jnp.zeros((C,), xn.dtype)
        # Padded tokens are one constant vector, so their q/k/v are the projection of
        # that vector (= the qkv bias for zero padding). Project only the real tokens and
        # pad the projected q/k/v instead: the same function at a third of the work at
        # 256 input (16x16 grid padded to 28x28).
        pad_qkv = self.attn.qkv(pad_xn[None])[0]
        qkv = _pad_tokens(self.attn.qkv(xn), hw_p, pad_qkv)
        # Padded tokens' outputs would be dropped: answer, project and adapt the real
        # tokens only.
        out = self.attn.proj(self.attn.attend_windows(qkv, ws, (H, W)))
        if self.adapters:
            out = self.Space_Adapter(out)
        if depth_chunk:
            # Depth attention mixes padded and real tokens across windows: run it on
            # the full padded windows, exactly as the original.
            xp = _window_partition(_pad_tokens(xn, hw_p, pad_xn), ws)
            out = out + _window_unpartition(self._depth_branch(xp, depth_chunk), hw_p, (H, W))
        return out

    def __call__(self, x: jax.Array, depth_chunk: int | None = None) -> jax.Array:
        x = x + self._attention_residual(x, depth_chunk)
        xn = self.norm2(x)
        if self.adapters:
            return x + self.mlp(xn) + MSA_MLP_SCALE * self.MLP_Adapter(xn)
        return x + self.mlp(xn)


class PatchEmbed(nnx.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, dtype, kernels: KernelPlan, rngs):
        self.proj = MatmulConv2d(in_chans, embed_dim, patch_size, stride=patch_size, dtype=dtype,
                                 kernels=kernels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class ImageEncoderViT(nnx.Module):
    """x float [B, H, W, 3] -> image embedding [B, H/16, W/16, out_chans].

    adapters: add the MSA Space/MLP/Depth adapters to every block.
    adapter_zero_init: zero the adapters' up-projections (adapted == base at start).
    pad_before_norm1: reproduce the MSA/FedFMS original, which zero-pads windows before
        norm1 (padded tokens enter attention as norm1.bias). Default False follows
        official SAM (normalise, then zero-pad).
    remat: recompute each block's activations in the backward pass instead of keeping
        them (global-attention maps dominate training memory at 1024 input).
    kernels: a `SamConfig.kernels` name or a resolved KernelPlan ("auto": from the
        default backend, once, here).
    scan_blocks: when the blocks repeat with a period (ViT-B: windowed, windowed, global,
        four times), trace and compile one period and `lax.scan` over the repeats. The
        same function; parameters stay stored (and named) per block, and every call
        stacks a copy of them for the scan. Off by default: on XLA:CPU it shortens the compile of
        deep encoders (ViT-H) but not ViT-B's (BENCHMARKS.md).
    depth_chunk (call): treat the batch as consecutive chunks of `depth_chunk` slices of a
        volume and add the MSA Depth branch (requires adapters). None: 2-D input.
    """

    def __init__(
        self,
        cfg: ViTConfig,
        img_size: int,
        *,
        adapters: bool = False,
        adapter_zero_init: bool = False,
        pad_before_norm1: bool = False,
        remat: bool = False,
        scan_blocks: bool = False,
        in_chans: int = 3,
        dtype=jnp.float32,
        kernels: KernelPlan | str = "auto",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.kernels = kernels = resolve_kernels(kernels)
        self.remat = remat
        self.scan_blocks = scan_blocks
        self.img_size = img_size
        self.adapters = adapters
        self.dtype = dtype
        grid = img_size // cfg.patch_size
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, in_chans, D, dtype=dtype, kernels=kernels, rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((1, grid, grid, D), jnp.float32))
        self.blocks = nnx.List(
            [
                Block(
                    D,
                    cfg.num_heads,
                    cfg.mlp_ratio,
                    0 if i in cfg.global_attn_indexes else cfg.window_size,
                    (grid, grid),
                    adapters=adapters,
                    adapter_zero_init=adapter_zero_init,
                    pad_before_norm1=pad_before_norm1,
                    dtype=dtype,
                    kernels=kernels,
                    rngs=rngs,
                )
                for i in range(cfg.depth)
            ]
        )
        conv = dict(use_bias=False, dtype=dtype, kernels=kernels, rngs=rngs)
        self.neck = nnx.List(
            [
                MatmulConv2d(D, cfg.out_chans, 1, **conv),
                LayerNorm2d(cfg.out_chans, dtype=dtype),
                MatmulConv2d(cfg.out_chans, cfg.out_chans, 3, **conv),
                LayerNorm2d(cfg.out_chans, dtype=dtype),
            ]
        )

    def __call__(self, x: jax.Array, depth_chunk: int | None = None) -> jax.Array:
        if depth_chunk and not self.adapters:
            raise ValueError("the 3-D depth branch needs adapters=True")
        x = self.patch_embed(x.astype(self.dtype))
        pos = self.pos_embed[...]
        if x.shape[1:3] != pos.shape[1:3]:
            raise ValueError(
                f"token grid {x.shape[1:3]} != pos_embed grid {pos.shape[1:3]}: build the "
                "model for this img_size and convert pos_embed with resize_pos_embed"
            )
        x = x + pos  # float32 residual stream
        run_block = lambda blk, x: blk(x, depth_chunk)  # noqa: E731
        if self.remat:
            run_block = nnx.remat(run_block)
        deep_barrier = self.kernels.barrier_between_blocks(len(self.blocks))
        barrier = cotangent_barrier if deep_barrier else (lambda x: x)

        def run_blocks(blocks, x):
            for blk in blocks:
                x = barrier(run_block(blk, x))
            return x

        period = self._block_period() if self.scan_blocks else None
        if period is None:
            x = run_blocks(self.blocks, x)
        else:
            x = self._scan_periods(run_blocks, period, x)
        for layer in self.neck:
            x = layer(x)
        return x

    def _block_period(self) -> int | None:
        """The smallest p such that block i is built exactly like block i % p (graph and
        parameter shapes), when the encoder holds at least two periods; else None."""
        def build(blk):
            graphdef, state = nnx.split(blk)
            return graphdef, [(v.shape, v.dtype) for v in jax.tree.leaves(state)]

        builds = [build(blk) for blk in self.blocks]
        n = len(builds)
        for p in range(1, n // 2 + 1):
            if n % p == 0 and all(builds[i] == builds[i % p] for i in range(p, n)):
                return p
        return None

    def _scan_periods(self, run_blocks, period: int, x: jax.Array) -> jax.Array:
        """run_blocks over all blocks as a lax.scan over periods of `period` blocks.

        Block j of each period's parameters are stacked on a leading axis (jnp.stack of
        the per-block leaves, so gradients flow back to them) and the scanned function
        rebuilds one period's blocks from a slice: one period is traced and compiled
        instead of every block. Remat and the cotangent barrier stay per block, inside
        the period: activation memory is as unrolled, and the backward still materialises
        the residual cotangent at every block boundary (XLA:CPU would otherwise re-fuse
        the chain through a period's blocks into each weight gradient)."""
        splits = [nnx.split(blk) for blk in self.blocks]
        graphdefs = [graphdef for graphdef, _ in splits[:period]]
        stacked = [jax.tree.map(lambda *leaves: jnp.stack(leaves), *[s for _, s in splits[j::period]])
                   for j in range(period)]

        def one_period(x, states):
            blocks = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
            return run_blocks(blocks, x), None

        x, _ = jax.lax.scan(one_period, x, stacked)
        return x
