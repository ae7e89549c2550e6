"""SAM's two-way transformer (the mask decoder's core), names as in segment_anything.

Tokens attend to the image, the image attends back to the tokens. LayerNorms here use
PyTorch's default eps 1e-5 (the encoder uses 1e-6).

Mixed precision: `dtype` is the dtype of matmul inputs; products accumulate into and
return float32, and the residual stream, norms and softmax stay float32 (the decoder is
small, its error budget is not).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fedfms_jax.models.kernels import KernelPlan, resolve_kernels

TRANSFORMER_LN_EPS = 1e-5


def layer_norm(dim: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance as PyTorch computes it; the fast E[x^2]-E[x]^2 form drifts.
    del dtype  # norms run in float32
    return nnx.LayerNorm(
        dim, epsilon=TRANSFORMER_LN_EPS, use_fast_variance=False, dtype=jnp.float32, rngs=rngs
    )


def linear(i: int, o: int, *, dtype, kernels: KernelPlan | str = "auto", rngs: nnx.Rngs) -> nnx.Linear:
    """Linear layer with `dtype` inputs and a float32 result."""
    return nnx.Linear(i, o, preferred_element_type=jnp.float32, rngs=rngs,
                      **resolve_kernels(kernels).linear_options(dtype))


class Attention(nnx.Module):
    """Multi-head attention whose projections may shrink the width by `downsample_rate`."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, *,
                 dtype=jnp.float32, kernels: KernelPlan | str = "auto", rngs: nnx.Rngs):
        self.internal_dim = embedding_dim // downsample_rate
        if self.internal_dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the attention width {self.internal_dim} "
                f"(embedding_dim {embedding_dim} / downsample_rate {downsample_rate})"
            )
        self.num_heads = num_heads
        self.dtype = dtype
        lin = lambda i, o: linear(i, o, dtype=dtype, kernels=kernels, rngs=rngs)  # noqa: E731
        self.q_proj = lin(embedding_dim, self.internal_dim)
        self.k_proj = lin(embedding_dim, self.internal_dim)
        self.v_proj = lin(embedding_dim, self.internal_dim)
        self.out_proj = lin(self.internal_dim, embedding_dim)

    def _heads(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(0, 2, 1, 3)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        dt, f32 = self.dtype, jnp.float32
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        logits = jnp.einsum("bhqc,bhkc->bhqk", q.astype(dt), k.astype(dt), preferred_element_type=f32)
        attn = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1)
        out = jnp.einsum("bhqk,bhkc->bhqc", attn.astype(dt), v.astype(dt), preferred_element_type=f32)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, h * c))


class MLPBlock(nnx.Module):
    """lin2(ReLU(lin1(x))) — segment_anything's MLPBlock with the decoder's ReLU."""

    def __init__(self, embedding_dim: int, mlp_dim: int, *, dtype=jnp.float32,
                 kernels: KernelPlan | str = "auto", rngs: nnx.Rngs):
        self.lin1 = linear(embedding_dim, mlp_dim, dtype=dtype, kernels=kernels, rngs=rngs)
        self.lin2 = linear(mlp_dim, embedding_dim, dtype=dtype, kernels=kernels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(jax.nn.relu(self.lin1(x)))


class TwoWayAttentionBlock(nnx.Module):
    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False, *,
                 dtype=jnp.float32, kernels: KernelPlan | str = "auto", rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        mm = dict(kw, kernels=resolve_kernels(kernels))
        self.self_attn = Attention(embedding_dim, num_heads, **mm)
        self.norm1 = layer_norm(embedding_dim, **kw)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, **mm)
        self.norm2 = layer_norm(embedding_dim, **kw)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, **mm)
        self.norm3 = layer_norm(embedding_dim, **kw)
        self.norm4 = layer_norm(embedding_dim, **kw)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate, **mm)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    def __init__(self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8,
                 mlp_dim: int = 2048, attention_downsample_rate: int = 2, *,
                 dtype=jnp.float32, kernels: KernelPlan | str = "auto", rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        mm = dict(kw, kernels=resolve_kernels(kernels))
        self.layers = nnx.List([
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0), **mm)
            for i in range(depth)
        ])
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, **mm)
        self.norm_final_attn = layer_norm(embedding_dim, **kw)

    def __call__(self, image_embedding: jax.Array, image_pe: jax.Array, point_embedding: jax.Array):
        """image_embedding [B,h,w,C], image_pe [B or 1,h,w,C], point_embedding [B,N,C]
        -> (queries [B,N,C], keys [B,h*w,C])."""
        b, h, w, c = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, c)
        keys = keys.astype(jnp.float32)
        point_embedding = point_embedding.astype(jnp.float32)
        key_pe = jnp.broadcast_to(image_pe.reshape(-1, h * w, c), (b, h * w, c)).astype(jnp.float32)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn_out = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys
