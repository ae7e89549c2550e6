"""TinyViT image encoder (MobileSAM, TinySAM, LiteMedSAM) in Flax NNX, NHWC.

Attribute names mirror the PyTorch `TinyViT` of MobileSAM / LiteMedSAM, so the shared
conversion rules map every checkpoint key (`image_encoder.layers.1.blocks.0.attn.qkv.weight`,
`...local_conv.bn.running_var`, ...) without a per-model table.

Numerics follow the PyTorch original in inference mode: BatchNorm uses its running
statistics (always, also under `model.train()`), LayerNorms use eps 1e-5 (PyTorch's
default) inside blocks and 1e-6 in the neck, GELU is exact.

MSA adapters (`adapters=True`) are placed as Medical-SAM-Adapter's `TinyViTAdapterBlock`
does, in every attention block (not in the convolutional stage 0):
  x = x + Space_Adapter(attn(x))                      (Space: with skip)
  x = local_conv(x)
  x = x + mlp(x) + 0.5 * MLP_Adapter(x)               (MLP: no skip, parallel to the MLP)
TinyViT's `Mlp` carries its own LayerNorm, so the MLP adapter sees the un-normalized
tokens, as in the original. `Depth_Adapter` is created for checkpoint compatibility and
is used only by the original's 3-D branch, which this port does not implement. Hidden
width dim/4. One deliberate difference: the original skips the Space adapter when the
feature map is exactly one window (H == W == window); here it applies in both paths
(the presets never take that path at their input size).

PyTorch's `attention_bias_idxs` is a non-persistent buffer (absent from checkpoints and
fully determined by the window), so it is a trace-time constant here, exposed under
the same name as a read-only property rather than a state variable.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.models.adapters import Adapter
from fedfms_jax.models.common import LayerNorm2d, depthwise_conv2d, gelu
from fedfms_jax.models.kernels import KernelPlan, resolve_kernels


@dataclasses.dataclass(frozen=True)
class TinyViTConfig:
    img_size: int
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)  # stage 0 is convolutional: its entry is unused
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    # Patch embed: two Conv2d_BN with this kernel and stride (padding kernel // 2).
    patch_kernel_size: int = 3
    patch_stride: int = 2
    # Stride of each PatchMerging's depthwise conv (stage i -> i+1). PyTorch hard-codes
    # stride 1 when the merged width is 320, 448 or 576, else 2.
    merge_strides: tuple[int, ...] = (2, 2, 1)
    out_chans: int = 256
    # Unused classifier head that MobileSAM/TinySAM checkpoints carry: None = no
    # norm_head/head (LiteMedSAM), 0 = norm_head only, n > 0 = norm_head + head(n).
    num_classes: int | None = None

    @property
    def embedding_size(self) -> int:
        """Side of the output grid (64 for every preset)."""
        return self.img_size // (self.patch_stride**2) // math.prod(self.merge_strides)


_TINY_VIT_5M = dict(embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10),
                    window_sizes=(7, 7, 14, 7))
TINY_VIT_PRESETS: dict[str, TinyViTConfig] = {
    "lite_medsam": TinyViTConfig(img_size=256, patch_kernel_size=1, patch_stride=1, **_TINY_VIT_5M),
    "mobile_sam": TinyViTConfig(img_size=1024, patch_kernel_size=3, patch_stride=2, num_classes=1000,
                                **_TINY_VIT_5M),
    # TinySAM distils into MobileSAM's TinyViT-5M unchanged.
    "tiny_sam": TinyViTConfig(img_size=1024, patch_kernel_size=3, patch_stride=2, num_classes=1000,
                              **_TINY_VIT_5M),
}


def torch_merge_stride(out_dim: int) -> int:
    """The stride PyTorch's PatchMerging picks from its output width."""
    return 1 if out_dim in (320, 448, 576) else 2


class Conv2d_BN(nnx.Module):
    """Conv (no bias) then BatchNorm on running statistics; torch names `c`, `bn`.

    The conv accumulates and returns float32 and the BatchNorm runs in float32 before the
    cast to the compute dtype: conv outputs can sit far from zero, and subtracting the
    running mean after rounding to bfloat16 would cancel most of their precision.
    """

    def __init__(self, a, b, ks=1, stride=1, pad=0, groups=1, *, dtype, rngs):
        self.c = nnx.Conv(a, b, (ks, ks), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                          feature_group_count=groups, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                          preferred_element_type=jnp.float32, rngs=rngs)
        self.bn = nnx.BatchNorm(b, use_running_average=True, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                                param_dtype=jnp.float32, rngs=rngs)
        self.dtype = dtype
        self.depthwise = groups > 1 and groups == a == b
        # A 1x1 conv is a matmul over channels; written as one, XLA:CPU runs it at its GEMM
        # rate instead of its convolution's (~8x slower for MBConv's 256x256 maps).
        self.pointwise = ks == 1 and stride == 1 and pad == 0 and groups == 1
        self.stride, self.pad = stride, pad

    def __call__(self, x):
        if self.depthwise:
            y = depthwise_conv2d(x, self.c.kernel[...], self.stride, self.pad, self.dtype)
        elif self.pointwise:
            y = jnp.einsum("nhwc,co->nhwo", x.astype(self.dtype), self.c.kernel[...][0, 0].astype(self.dtype),
                           preferred_element_type=jnp.float32)
        else:
            y = self.c(x)
        return self.bn(y, use_running_average=True).astype(self.dtype)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: TinyViTConfig, *, dtype, rngs):
        n, k, s = cfg.embed_dims[0], cfg.patch_kernel_size, cfg.patch_stride
        self.seq = nnx.List([
            Conv2d_BN(cfg.in_chans, n // 2, k, s, k // 2, dtype=dtype, rngs=rngs),
            None,  # GELU
            Conv2d_BN(n // 2, n, k, s, k // 2, dtype=dtype, rngs=rngs),
        ])

    def __call__(self, x):
        return self.seq[2](gelu(self.seq[0](x)))


class MBConv(nnx.Module):
    def __init__(self, dim, expand_ratio, *, dtype, rngs):
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2d_BN(dim, hidden, 1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2d_BN(hidden, hidden, 3, 1, 1, groups=hidden, dtype=dtype, rngs=rngs)
        self.conv3 = Conv2d_BN(hidden, dim, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        y = gelu(self.conv1(x))
        y = gelu(self.conv2(y))
        return gelu(self.conv3(y) + x)


class PatchMerging(nnx.Module):
    def __init__(self, dim, out_dim, stride, *, dtype, rngs):
        self.conv1 = Conv2d_BN(dim, out_dim, 1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim, dtype=dtype, rngs=rngs)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv3(gelu(self.conv2(gelu(self.conv1(x)))))


class ConvLayer(nnx.Module):
    def __init__(self, dim, depth, expand_ratio, downsample, *, dtype, rngs):
        self.blocks = nnx.List([MBConv(dim, expand_ratio, dtype=dtype, rngs=rngs) for _ in range(depth)])
        self.downsample = downsample

    def __call__(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


@functools.lru_cache(maxsize=None)
def attention_bias_index(window: int) -> tuple[np.ndarray, int]:
    """(N, N) index into the per-offset bias table and the number of offsets, in the
    order PyTorch's TinyViT enumerates them (first-seen |dy|, |dx| offset)."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = np.empty((len(points), len(points)), np.int32)
    for i, (y1, x1) in enumerate(points):
        for j, (y2, x2) in enumerate(points):
            idxs[i, j] = offsets.setdefault((abs(y1 - y2), abs(x1 - x2)), len(offsets))
    idxs.setflags(write=False)
    return idxs, len(offsets)


class Attention(nnx.Module):
    """LeViT-style attention with a learned bias per (|dy|, |dx|) offset in the window."""

    def __init__(self, dim, key_dim, num_heads, window, *, dtype, rngs):
        self.num_heads, self.key_dim, self.d = num_heads, key_dim, key_dim  # attn_ratio 1
        self.scale = key_dim**-0.5
        self.window = window
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                                  param_dtype=jnp.float32, rngs=rngs)
        self.qkv = nnx.Linear(dim, num_heads * (2 * key_dim + self.d), dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)
        self.proj = nnx.Linear(num_heads * self.d, dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        _, n_offsets = attention_bias_index(window)
        self.attention_biases = nnx.Param(jnp.zeros((num_heads, n_offsets), jnp.float32))

    @property
    def attention_bias_idxs(self) -> np.ndarray:
        # PyTorch registers this buffer with persistent=False: it is in no state dict and
        # is fully determined by the window, so it is a trace-time constant here.
        return attention_bias_index(self.window)[0]

    def __call__(self, x):  # (B, N, C)
        b, n, _ = x.shape
        x = self.norm(x)
        qkv = self.qkv(x).reshape(b, n, self.num_heads, -1).transpose(0, 2, 1, 3)  # heads first
        q, k, v = jnp.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
        bias = self.attention_biases[...][:, self.attention_bias_idxs]  # (heads, N, N)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * self.scale + bias
        # Softmax normalised after the value product (the same sums; the max shift cancels):
        # one pass less over the (heads, N, N) scores, ~7x faster on XLA:CPU than
        # jax.nn.softmax between the two products.
        p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
        out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        out = (out / p.sum(axis=-1, keepdims=True)).astype(v.dtype)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, self.num_heads * self.d))


class Mlp(nnx.Module):
    def __init__(self, dim, hidden, *, dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, **kw)
        self.fc1 = nnx.Linear(dim, hidden, **kw)
        self.fc2 = nnx.Linear(hidden, dim, **kw)

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(self.norm(x))))


def _window_partition(x, ws):
    """(B, H, W, C) -> zero-padded windows (B*nH*nW, ws*ws, C) and the padded size."""
    b, h, w, c = x.shape
    ph, pw = -h % ws, -w % ws
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c), (hp, wp)


def _window_unpartition(x, ws, padded, size, batch):
    (hp, wp), (h, w) = padded, size
    c = x.shape[-1]
    x = x.reshape(batch, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, hp, wp, c)[:, :h, :w]


class TinyViTBlock(nnx.Module):
    def __init__(self, dim, num_heads, window, mlp_ratio, local_conv_size, *, adapters,
                 adapter_zero_init, dtype, kernels: KernelPlan, rngs):
        self.window = window
        self.attn = Attention(dim, dim // num_heads, num_heads, window, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
        pad = local_conv_size // 2
        self.local_conv = Conv2d_BN(dim, dim, local_conv_size, 1, pad, groups=dim, dtype=dtype, rngs=rngs)
        if adapters:
            kw = dict(zero_init=adapter_zero_init, dtype=dtype, kernels=kernels, rngs=rngs)
            self.MLP_Adapter = Adapter(dim, skip_connect=False, **kw)
            self.Space_Adapter = Adapter(dim, skip_connect=True, **kw)
            self.Depth_Adapter = Adapter(dim, skip_connect=False, **kw)  # 3-D branch only
        else:
            self.MLP_Adapter = self.Space_Adapter = self.Depth_Adapter = None

    def __call__(self, x):  # (B, H, W, C)
        b, h, w, c = x.shape
        ws = self.window
        if h == ws and w == ws:
            a = self.attn(x.reshape(b, h * w, c)).reshape(b, h, w, c)
        else:
            windows, padded = _window_partition(x, ws)
            a = _window_unpartition(self.attn(windows), ws, padded, (h, w), b)
        if self.Space_Adapter is not None:
            a = self.Space_Adapter(a)  # per token: same before or after un-partitioning
        x = x + a
        x = self.local_conv(x)
        out = x + self.mlp(x)
        if self.MLP_Adapter is not None:
            out = out + 0.5 * self.MLP_Adapter(x)
        return out


class BasicLayer(nnx.Module):
    def __init__(self, dim, depth, num_heads, window, cfg: TinyViTConfig, downsample, *, adapters,
                 adapter_zero_init, dtype, kernels: KernelPlan, rngs):
        self.blocks = nnx.List([
            TinyViTBlock(dim, num_heads, window, cfg.mlp_ratio, cfg.local_conv_size, adapters=adapters,
                         adapter_zero_init=adapter_zero_init, dtype=dtype, kernels=kernels, rngs=rngs)
            for _ in range(depth)
        ])
        self.downsample = downsample

    def __call__(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nnx.Module):
    """`__call__(x: (B, H, W, in_chans)) -> (B, H', W', out_chans)`; H' = H / (patch_stride² ·
    prod(merge_strides)), i.e. 64 for the presets at their `img_size`."""

    def __init__(self, cfg: TinyViTConfig, *, adapters: bool = False, adapter_zero_init: bool = False,
                 dtype=jnp.float32, kernels: KernelPlan | str = "auto", rngs: nnx.Rngs):
        self.cfg = cfg
        # Only the MSA adapters' products depend on the plan; TinyViT's own layers are plain.
        kernels = resolve_kernels(kernels)
        dims, n = cfg.embed_dims, len(cfg.depths)
        if not (len(dims) == len(cfg.num_heads) == len(cfg.window_sizes) == n == len(cfg.merge_strides) + 1):
            raise ValueError(f"inconsistent TinyViT stage settings: {cfg}")
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        layers = []
        for i in range(n):
            down = None
            if i < n - 1:
                down = PatchMerging(dims[i], dims[i + 1], cfg.merge_strides[i], dtype=dtype, rngs=rngs)
            if i == 0:
                layers.append(ConvLayer(dims[0], cfg.depths[0], cfg.mbconv_expand_ratio, down, dtype=dtype,
                                        rngs=rngs))
            else:
                layers.append(BasicLayer(dims[i], cfg.depths[i], cfg.num_heads[i], cfg.window_sizes[i], cfg,
                                         down, adapters=adapters, adapter_zero_init=adapter_zero_init,
                                         dtype=dtype, kernels=kernels, rngs=rngs))
        self.layers = nnx.List(layers)
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        if cfg.num_classes is not None:  # carried for checkpoint compatibility, never applied
            self.norm_head = nnx.LayerNorm(dims[-1], epsilon=1e-5, **kw)
            self.head = nnx.Linear(dims[-1], cfg.num_classes, **kw) if cfg.num_classes > 0 else None
        self.neck = nnx.List([
            nnx.Conv(dims[-1], cfg.out_chans, (1, 1), use_bias=False, preferred_element_type=jnp.float32, **kw),
            LayerNorm2d(cfg.out_chans, eps=1e-6, dtype=dtype),
            nnx.Conv(cfg.out_chans, cfg.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                     preferred_element_type=jnp.float32, **kw),  # LayerNorm2d follows: center in f32
            LayerNorm2d(cfg.out_chans, eps=1e-6, dtype=dtype),
        ])
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.patch_embed(x.astype(self.dtype))
        for layer in self.layers:
            x = layer(x)
        for m in self.neck:
            x = m(x)
        return x


def infer_tiny_vit_config(state_dict_shapes: Mapping[str, tuple], *, embedding_size: int = 64) -> TinyViTConfig:
    """Rebuild a TinyViT's settings from a checkpoint's keys and shapes.

    Keys may carry the `image_encoder.` prefix (other keys are ignored) or not. Derived:
    stage widths, depths, heads (rows of `attention_biases`), windows (an offset table of
    w*w entries, or `attention_bias_idxs` of (w*w, w*w) when present), MLP and MBConv
    ratios, local-conv and patch-embed kernels, in/out channels and the classifier head.
    Not stored in a checkpoint, so taken from the PyTorch code: the patch-embed stride
    (1 for a 1x1 kernel, else 2), the PatchMerging strides (its width rule), stage 0's
    unused window (7) and `img_size`, which PyTorch fixes through its 64x64 output grid.
    """
    shapes = {k: tuple(v) for k, v in state_dict_shapes.items()}
    prefix = "image_encoder."
    if any(k.startswith(prefix) for k in shapes):
        shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}

    def get(key):
        if key not in shapes:
            raise KeyError(f"not a TinyViT checkpoint: no {prefix}{key}")
        return shapes[key]

    n_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("layers."))
    depths = tuple(
        1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(f"layers.{i}.blocks."))
        for i in range(n_layers)
    )
    stem = get("patch_embed.seq.0.c.weight")  # (n/2, in_chans, k, k)
    dims = [get("patch_embed.seq.2.c.weight")[0]]
    for i in range(1, n_layers):
        dims.append(get(f"layers.{i - 1}.downsample.conv1.c.weight")[0])
    heads, windows = [1], [7]
    for i in range(1, n_layers):
        h, n_offsets = get(f"layers.{i}.blocks.0.attn.attention_biases")
        idx = shapes.get(f"layers.{i}.blocks.0.attn.attention_bias_idxs")
        w = math.isqrt(idx[0]) if idx else math.isqrt(n_offsets)
        if w * w != (idx[0] if idx else n_offsets):
            raise ValueError(f"layer {i}: cannot read a square window from {n_offsets} offsets")
        heads.append(h)
        windows.append(w)
    if n_layers > 1:  # unused by the conv stage: keep stage 1's head width, as the presets do
        heads[0] = max(1, dims[0] // (dims[1] // heads[1]))
    mlp_ratio = get("layers.1.blocks.0.mlp.fc1.weight")[0] / dims[1] if n_layers > 1 else 4.0
    expand = get("layers.0.blocks.0.conv1.c.weight")[0] / dims[0]
    local_conv = get("layers.1.blocks.0.local_conv.c.weight")[-1] if n_layers > 1 else 3
    k = stem[-1]
    patch_stride = 1 if k == 1 else 2
    merge = tuple(torch_merge_stride(d) for d in dims[1:])
    if "norm_head.weight" in shapes:
        num_classes = get("head.weight")[0] if "head.weight" in shapes else 0
    else:
        num_classes = None
    return TinyViTConfig(
        img_size=embedding_size * patch_stride**2 * math.prod(merge),
        in_chans=stem[1],
        embed_dims=tuple(int(d) for d in dims),
        depths=depths,
        num_heads=tuple(int(h) for h in heads),
        window_sizes=tuple(windows),
        mlp_ratio=float(mlp_ratio),
        mbconv_expand_ratio=float(expand),
        local_conv_size=int(local_conv),
        patch_kernel_size=int(k),
        patch_stride=patch_stride,
        merge_strides=merge,
        out_chans=get("neck.0.weight")[0],
        num_classes=num_classes,
    )
