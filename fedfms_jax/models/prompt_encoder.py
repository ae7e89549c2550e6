"""SAM's prompt encoder (points, boxes, masks), batched over images, NHWC.

Attribute names mirror segment_anything's PromptEncoder so state-dict keys line up.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.models.common import Buffer, LayerNorm2d, gelu


class PositionEmbeddingRandom(nnx.Module):
    """Random-Fourier positional encoding; the Gaussian matrix is a fixed buffer."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None, *, rngs: nnx.Rngs):
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.positional_encoding_gaussian_matrix = Buffer(
            scale * jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32)
        )

    def _pe_encoding(self, coords: jax.Array) -> jax.Array:
        """coords in [0,1], [..., 2] (x, y) -> [..., 2 * num_pos_feats] float32."""
        coords = 2.0 * coords.astype(jnp.float32) - 1.0
        coords = coords @ self.positional_encoding_gaussian_matrix[...]
        coords = 2.0 * np.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def __call__(self, size: tuple[int, int]) -> jax.Array:
        """Dense encoding of an h x w grid of pixel centres -> [h, w, C]."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self._pe_encoding(grid)

    def forward_with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """Pixel coordinates [..., 2] (x, y) in an image of size (H, W) -> [..., C]."""
        coords = coords.astype(jnp.float32) / jnp.array([image_size[1], image_size[0]], jnp.float32)
        return self._pe_encoding(coords)


class PromptEncoder(nnx.Module):
    def __init__(self, embed_dim: int = 256, image_embedding_size: tuple[int, int] = (64, 64),
                 input_image_size: tuple[int, int] = (1024, 1024), mask_in_chans: int = 16, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.dtype = dtype
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, rngs=rngs)
        embed = lambda: nnx.Embed(1, embed_dim, rngs=rngs)  # noqa: E731
        # pos/neg point + the two box corners
        self.point_embeddings = nnx.List([embed() for _ in range(4)])
        self.not_a_point_embed = embed()
        conv = lambda i, o, k: nnx.Conv(i, o, (k, k), strides=(k, k), padding="VALID",  # noqa: E731
                                        dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs)
        # None where torch's Sequential holds a GELU, so indices match the state dict.
        self.mask_downscaling = nnx.List([
            conv(1, mask_in_chans // 4, 2),
            LayerNorm2d(mask_in_chans // 4),
            None,
            conv(mask_in_chans // 4, mask_in_chans, 2),
            LayerNorm2d(mask_in_chans),
            None,
            conv(mask_in_chans, embed_dim, 1),
        ])
        self.no_mask_embed = embed()

    def get_dense_pe(self) -> jax.Array:
        """Positional encoding of the image-embedding grid, [1, h, w, C] float32."""
        return self.pe_layer(self.image_embedding_size)[None]

    def _token(self, embed: nnx.Embed) -> jax.Array:
        return embed.embedding[...][0]

    def _embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        points = points.astype(jnp.float32) + 0.5  # centre of the pixel
        labels = labels.astype(jnp.int32)
        if pad:
            b = points.shape[0]
            points = jnp.concatenate([points, jnp.zeros((b, 1, 2), jnp.float32)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((b, 1), jnp.int32)], axis=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == -1, self._token(self.not_a_point_embed), emb)
        emb = emb + jnp.where(lab == 0, self._token(self.point_embeddings[0]), 0.0)
        emb = emb + jnp.where(lab == 1, self._token(self.point_embeddings[1]), 0.0)
        return emb

    def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
        corners = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_tokens = jnp.stack([self._token(self.point_embeddings[2]),
                                   self._token(self.point_embeddings[3])])
        return emb + corner_tokens

    def _embed_masks(self, masks: jax.Array) -> jax.Array:
        x = masks.astype(jnp.float32)
        for layer in self.mask_downscaling:
            x = gelu(x) if layer is None else layer(x)
        return x

    def __call__(self, points: Optional[tuple[jax.Array, jax.Array]] = None,
                 boxes: Optional[jax.Array] = None, masks: Optional[jax.Array] = None,
                 batch_size: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
        """Embed prompts for a batch of images.

        points: (coords [B,N,2] in input-image pixels (x, y), labels [B,N]: 1 foreground,
        0 background, -1 padding); boxes [B,4] (x0, y0, x1, y1); masks [B,4h,4w,1] logits.
        Returns sparse [B, N', C] and dense [B, h, w, C] embeddings (float32; `dtype` only
        sets the input dtype of the mask convolutions).
        """
        if batch_size is None:
            if points is not None:
                batch_size = points[0].shape[0]
            elif boxes is not None:
                batch_size = boxes.shape[0]
            elif masks is not None:
                batch_size = masks.shape[0]
            else:
                batch_size = 1
        parts = []
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if parts:
            sparse = jnp.concatenate(parts, axis=1)
        else:
            sparse = jnp.zeros((batch_size, 0, self.embed_dim), jnp.float32)
        if masks is not None:
            expected = self.mask_input_size
            if tuple(masks.shape[1:3]) != expected:
                raise ValueError(
                    f"mask inputs must be [B, {expected[0]}, {expected[1]}, 1] (4x the image "
                    f"embedding grid), got {tuple(masks.shape)}"
                )
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = jnp.broadcast_to(self._token(self.no_mask_embed), (batch_size, h, w, self.embed_dim))
        return sparse, dense
