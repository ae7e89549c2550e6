"""SAM's mask decoder, NHWC, with FedFMS's two variants behind options.

- `prompt_free=True` (the original FedFMS decoder): the sparse and dense prompt
  embeddings are dropped; tokens are the IoU token and mask tokens only and the image
  embedding enters the transformer without the dense prompt added.
- `num_classes > 1`: a 1x1 conv `seg1` maps all four mask-token masks to `num_classes`
  logit channels (the IoU prediction is still sliced as for single/multi-mask output).

`dtype` is the matmul/conv input dtype; results and the rest run in float32.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from fedfms_jax.models.common import LayerNorm2d, UpConv2x2, gelu
from fedfms_jax.models.kernels import KernelPlan, resolve_kernels
from fedfms_jax.models.transformer import TwoWayTransformer, linear


class MLP(nnx.Module):
    """Linear layers with ReLU between them (MaskFormer-style head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 sigmoid_output: bool = False, *, dtype=jnp.float32,
                 kernels: KernelPlan | str = "auto", rngs: nnx.Rngs):
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nnx.List([
            linear(i, o, dtype=dtype, kernels=kernels, rngs=rngs) for i, o in zip(dims[:-1], dims[1:])
        ])
        self.sigmoid_output = sigmoid_output

    def __call__(self, x: jax.Array) -> jax.Array:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = jax.nn.relu(x)
        return jax.nn.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nnx.Module):
    def __init__(self, transformer_dim: int = 256, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256, *,
                 transformer_depth: int = 2, transformer_heads: int = 8, transformer_mlp_dim: int = 2048,
                 prompt_free: bool = False, num_classes: int = 1,
                 dtype=jnp.float32, kernels: KernelPlan | str = "auto", rngs: nnx.Rngs):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        c = transformer_dim
        self.transformer_dim = c
        self.num_mask_tokens = num_multimask_outputs + 1
        self.prompt_free = prompt_free
        self.num_classes = num_classes
        self.dtype = dtype
        kernels = resolve_kernels(kernels)
        self.transformer = TwoWayTransformer(transformer_depth, c, transformer_heads, transformer_mlp_dim,
                                             dtype=dtype, kernels=kernels, rngs=rngs)
        self.iou_token = nnx.Embed(1, c, rngs=rngs)
        self.mask_tokens = nnx.Embed(self.num_mask_tokens, c, rngs=rngs)
        up = lambda i, o: UpConv2x2(i, o, dtype=dtype, kernels=kernels, rngs=rngs)  # noqa: E731
        # None at the GELU positions of torch's Sequential.
        self.output_upscaling = nnx.List([up(c, c // 4), LayerNorm2d(c // 4), None,
                                          up(c // 4, c // 8), None])
        self.output_hypernetworks_mlps = nnx.List([
            MLP(c, c, c // 8, 3, dtype=dtype, kernels=kernels, rngs=rngs) for _ in range(self.num_mask_tokens)
        ])
        self.iou_prediction_head = MLP(c, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth,
                                       dtype=dtype, kernels=kernels, rngs=rngs)
        if num_classes > 1:
            self.seg1 = nnx.Conv(self.num_mask_tokens, num_classes, (1, 1), dtype=dtype,
                                 preferred_element_type=jnp.float32, rngs=rngs)

    def predict_masks(self, image_embeddings: jax.Array, image_pe: jax.Array,
                      sparse_prompt_embeddings: Optional[jax.Array],
                      dense_prompt_embeddings: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """All mask-token masks [B,4h,4w,num_mask_tokens] and IoU predictions [B,num_mask_tokens]."""
        dt, f32 = self.dtype, jnp.float32
        output_tokens = jnp.concatenate([self.iou_token.embedding[...], self.mask_tokens.embedding[...]])
        b = image_embeddings.shape[0]
        if not self.prompt_free and sparse_prompt_embeddings is not None:
            b = max(b, sparse_prompt_embeddings.shape[0])
        tokens = jnp.broadcast_to(output_tokens, (b, *output_tokens.shape))
        # One image embedding may serve a batch of prompts (official repeat_interleave).
        src = jnp.broadcast_to(image_embeddings.astype(f32), (b, *image_embeddings.shape[1:]))
        if not self.prompt_free:
            if sparse_prompt_embeddings is not None:
                tokens = jnp.concatenate([tokens, sparse_prompt_embeddings.astype(f32)], axis=1)
            if dense_prompt_embeddings is not None:
                src = src + dense_prompt_embeddings.astype(f32)
        _, h, w, c = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]

        x = src.reshape(b, h, w, c)
        for layer in self.output_upscaling:
            x = gelu(x) if layer is None else layer(x)
        hyper_in = jnp.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            axis=1,
        )
        masks = jnp.einsum("bhwc,bkc->bhwk", x.astype(dt), hyper_in.astype(dt), preferred_element_type=f32)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred

    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array,
                 sparse_prompt_embeddings: Optional[jax.Array] = None,
                 dense_prompt_embeddings: Optional[jax.Array] = None,
                 multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
        """image_embeddings [B,h,w,C], image_pe [1,h,w,C], sparse [B,N,C], dense [B,h,w,C]
        -> (low-res mask logits [B,4h,4w,K] float32, IoU predictions [B,K'] float32).

        K is 3 with multimask_output else 1, or num_classes when num_classes > 1;
        K' is 3 or 1. In prompt-free mode the prompt embeddings are ignored.
        """
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe,
                                              sparse_prompt_embeddings, dense_prompt_embeddings)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        if self.num_classes > 1:
            masks = self.seg1(masks)
        else:
            masks = masks[..., sel]
        return masks.astype(jnp.float32), iou_pred[:, sel].astype(jnp.float32)
