"""Small building blocks shared by every SAM-family module."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedfms_jax.models.kernels import KernelPlan, resolve_kernels


class Buffer(nnx.Variable):
    """A fixed tensor that PyTorch keeps in the state dict but never trains
    (e.g. the prompt encoder's random Fourier matrix). Not an nnx.Param, so it is never
    trainable, never averaged and never sent."""


def gelu(x: jax.Array) -> jax.Array:
    # PyTorch's nn.GELU default is the exact erf form, not the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


class LayerNorm2d(nnx.Module):
    """SAM's LayerNorm2d over the channel axis of an NHWC tensor.

    Parameters are named `weight` and `bias` as in PyTorch (no leaf rename needed).
    Statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        y = (x32 - mean) / jnp.sqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(self.dtype)


class UpConv2x2(nnx.Module):
    """PyTorch's ConvTranspose2d(kernel_size=2, stride=2) as one matmul + depth-to-space.

    With stride equal to the kernel size, every output pixel receives exactly one input
    pixel, so the transposed convolution is a per-pixel [C_in -> 2*2*C_out] matmul: the
    same sums as the convolution, without XLA:CPU's slow dilated-convolution kernel.
    Parameters match `nnx.ConvTranspose(..., transpose_kernel=True)`: kernel
    [2, 2, out, in], bias [out].
    """

    def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32,
                 kernels: KernelPlan | str = "auto", rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2)
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, out_features, in_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.dtype = dtype
        self.kernels = resolve_kernels(kernels)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, _ = x.shape
        k = self.kernel[...]
        y = self.kernels.einsum("nhwc,pqoc->nhpwqo", x, k, self.dtype)
        return y.reshape(B, 2 * H, 2 * W, k.shape[2]) + self.bias[...]


class MatmulConv2d(nnx.Module):
    """The two convolutions of SAM's ViT encoder as plain matmuls.

    Either non-overlapping patches (stride == kernel size, no padding: the patch
    embedding) or stride 1 with "same" zero padding (the neck's 1x1 and 3x3). Each output
    pixel is one [kh*kw*C_in -> C_out] product, so the sums are the convolution's; the
    weight gradient is a matmul too, where XLA:CPU's convolution backward inside a
    training loop took 0.6 s per ViT-B step. Parameters match `nnx.Conv`: kernel
    [kh, kw, in, out], optional bias [out].
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
                 use_bias: bool = True, dtype=jnp.float32, kernels: KernelPlan | str = "auto",
                 rngs: nnx.Rngs):
        if stride not in (1, kernel_size) or (stride == 1 and kernel_size % 2 == 0):
            raise ValueError("MatmulConv2d supports stride == kernel_size, or stride 1 with an odd kernel")
        k = kernel_size
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (k, k, in_features, out_features),
                                                               jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.stride = stride
        self.dtype = dtype
        self.kernels = resolve_kernels(kernels)

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...]
        kh, kw, cin, _ = k.shape
        B, H, W, _ = x.shape
        if self.stride == kh and kh > 1:  # non-overlapping patches
            x = x.reshape(B, H // kh, kh, W // kw, kw, cin)
            y = self.kernels.einsum("nhpwqc,pqco->nhwo", x, k, self.dtype)
        elif kh == 1:
            y = self.kernels.einsum("nhwc,co->nhwo", x, k[0, 0], self.dtype)
        else:  # stride 1, "same" padding: gather the kh*kw shifted views (im2col)
            ph, pw = kh // 2, kw // 2
            xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
            cols = jnp.stack([xp[:, i:i + H, j:j + W] for i in range(kh) for j in range(kw)], axis=3)
            y = self.kernels.einsum("nhwkc,kco->nhwo", cols, k.reshape(kh * kw, cin, -1), self.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, pad: int, dtype) -> jax.Array:
    """A depthwise convolution (one filter per channel, torch groups=channels) as a sum of
    kh*kw shifted, strided views scaled per channel: the same products and float32 sums.
    XLA:CPU runs grouped convolutions 30-40x slower than this (measured [4,64,64,256],
    3x3: 439 ms vs 12 ms); kernel is nnx.Conv's [kh, kw, 1, C]."""
    kh, kw = kernel.shape[:2]
    B, H, W, C = x.shape
    ho, wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    xp = jnp.pad(x.astype(dtype), ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(jnp.float32)
    w = kernel.astype(dtype).astype(jnp.float32)  # products of dtype values, exact in float32
    out = jnp.zeros((B, ho, wo, C), jnp.float32)
    for i in range(kh):
        for j in range(kw):
            view = xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride]
            out = out + view * w[i, j, 0]
    return out

