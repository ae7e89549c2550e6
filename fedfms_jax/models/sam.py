"""The assembled SAM: image encoder (ViT or TinyViT, optional MSA adapters), prompt
encoder and mask decoder, with FedFMS's prompt-free and multi-class variants.

Layout is NHWC: images [B,H,W,3], low-res logits [B,H/4,W/4,K] for ViT encoders.
Attribute names mirror segment_anything's `Sam`, so a PyTorch state dict loads with
`weights_convert.torch_state.load_state_dict`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.models.image_encoder import VIT_CONFIGS, ImageEncoderViT
from fedfms_jax.models.kernels import KERNEL_NAMES, resolve_kernels
from fedfms_jax.models.mask_decoder import MaskDecoder
from fedfms_jax.models.prompt_encoder import PromptEncoder
from fedfms_jax.models.tiny_vit import TINY_VIT_PRESETS, TinyViT, TinyViTConfig

# SAM's pixel statistics (0..255 RGB), as registered in segment_anything's Sam.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
ENCODERS = ("vit_b", "vit_l", "vit_h", "vit_tiny", "tiny_vit")
PIXEL_NORMS = ("sam", "unit")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MASK_IN_CHANS = 16


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """What model to build.

    encoder: vit_b | vit_l | vit_h | vit_tiny (test size) | tiny_vit.
    image_size: square input side; a multiple of 16 for ViT encoders.
    adapters / adapter_zero_init: MSA adapters in every encoder block (FedMSA).
    pad_before_norm1: ViT only; the MSA/FedFMS originals' window padding order.
    prompt_free: FedFMS decoder that ignores every prompt.
    num_classes: > 1 adds the `seg1` 1x1 conv over the four mask-token masks.
    pixel_norm: "sam" (mean/std, what official weights expect) or "unit" (x / 255, what
        the FedFMS original trains with); used by `preprocess`.
    dtype: the image encoder's compute dtype, "float32" or "bfloat16" (parameters stay
        float32).
    remat: ViT only; recompute encoder blocks in the backward pass to fit larger batches.
    scan_blocks: ViT only; compile one period of the encoder's repeating blocks and scan
        over the repeats (ImageEncoderViT). The same function; a shorter compile for
        deep encoders, a copy of the block weights per step.
    decoder_dtype: matmul dtype of the prompt encoder and mask decoder. float32 by
        default: they are under 1% of the FLOPs at 1024 input and in bfloat16 they add
        about as much logit error as the whole encoder does.
    tiny_vit: TinyViTConfig or a preset name (TINY_VIT_PRESETS); None = "tiny_sam" at
        image_size.
    kernels: which program each backend gets (models/kernels): "auto" (from the default
        backend when the model is built), "cpu", "gpu" or "reference" (the plain SAM
        math). The same function either way; only speed and rounding differ.
    """

    encoder: str = "vit_b"
    image_size: int = 1024
    adapters: bool = False
    adapter_zero_init: bool = False
    prompt_free: bool = False
    num_classes: int = 1
    pixel_norm: str = "sam"
    dtype: str = "float32"
    tiny_vit: Union[TinyViTConfig, str, None] = None
    pad_before_norm1: bool = False
    decoder_dtype: str = "float32"
    remat: bool = False
    scan_blocks: bool = False
    kernels: str = "auto"

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"SamConfig.encoder={self.encoder!r} is not one of {ENCODERS}")
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"SamConfig.image_size must be a positive int, got {self.image_size!r}")
        if self.encoder in VIT_CONFIGS:
            patch = VIT_CONFIGS[self.encoder].patch_size
            if self.image_size % patch:
                lo = self.image_size // patch * patch
                raise ValueError(
                    f"SamConfig.image_size={self.image_size} is not divisible by the {self.encoder} "
                    f"patch size {patch}; use a multiple of {patch}, e.g. {max(lo, patch)} or {lo + patch}"
                )
        if self.tiny_vit is not None and self.encoder != "tiny_vit":
            raise ValueError(f"SamConfig.tiny_vit is set but encoder={self.encoder!r}; use encoder='tiny_vit'")
        if self.encoder == "tiny_vit":
            tcfg = self.tiny_vit_config
            if tcfg.img_size != self.image_size:
                raise ValueError(
                    f"SamConfig.image_size={self.image_size} but the TinyViT config takes "
                    f"{tcfg.img_size}x{tcfg.img_size} input; set image_size={tcfg.img_size}"
                )
            if self.pad_before_norm1:
                raise ValueError("pad_before_norm1 applies to ViT encoders only")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"SamConfig.num_classes must be an int >= 1, got {self.num_classes!r}")
        if self.pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"SamConfig.pixel_norm={self.pixel_norm!r} is not one of {PIXEL_NORMS}")
        for field in ("dtype", "decoder_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"SamConfig.{field}={getattr(self, field)!r} is not one of {tuple(DTYPES)}")
        if self.kernels not in KERNEL_NAMES:
            raise ValueError(f"SamConfig.kernels={self.kernels!r} is not one of {KERNEL_NAMES}")
        if self.adapter_zero_init and not self.adapters:
            raise ValueError("SamConfig.adapter_zero_init=True needs adapters=True")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def tiny_vit_config(self) -> TinyViTConfig:
        t = self.tiny_vit
        if t is None:
            return dataclasses.replace(TINY_VIT_PRESETS["tiny_sam"], img_size=self.image_size)
        if isinstance(t, str):
            if t not in TINY_VIT_PRESETS:
                raise ValueError(f"unknown TinyViT preset {t!r}; expected one of {sorted(TINY_VIT_PRESETS)}")
            return TINY_VIT_PRESETS[t]
        return t

    @property
    def embed_dim(self) -> int:
        """Channels of the image embedding = width of the prompt encoder and decoder."""
        if self.encoder == "tiny_vit":
            return self.tiny_vit_config.out_chans
        return VIT_CONFIGS[self.encoder].out_chans

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (64 at 1024 input)."""
        if self.encoder == "tiny_vit":
            return self.tiny_vit_config.embedding_size
        return self.image_size // VIT_CONFIGS[self.encoder].patch_size


def preprocess(images, pixel_norm: str = "sam") -> jax.Array:
    """Pixel values 0..255 (uint8 or float) [B,H,W,3] -> float32 model input.

    "sam": (x - mean) / std with SAM's statistics; "unit": x / 255 as the FedFMS original.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    if pixel_norm == "sam":
        return (x - jnp.array(PIXEL_MEAN, jnp.float32)) / jnp.array(PIXEL_STD, jnp.float32)
    if pixel_norm == "unit":
        return x / 255.0
    raise ValueError(f"pixel_norm={pixel_norm!r} is not one of {PIXEL_NORMS}")


class Sam(nnx.Module):
    def __init__(self, cfg: SamConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Resolved once, here: every submodule keeps this plan.
        self.kernels = kernels = resolve_kernels(cfg.kernels)
        dt = cfg.compute_dtype
        if cfg.encoder == "tiny_vit":
            self.image_encoder = TinyViT(cfg.tiny_vit_config, adapters=cfg.adapters,
                                         adapter_zero_init=cfg.adapter_zero_init, dtype=dt,
                                         kernels=kernels, rngs=rngs)
        else:
            self.image_encoder = ImageEncoderViT(
                VIT_CONFIGS[cfg.encoder], cfg.image_size, adapters=cfg.adapters,
                adapter_zero_init=cfg.adapter_zero_init, pad_before_norm1=cfg.pad_before_norm1,
                remat=cfg.remat, scan_blocks=cfg.scan_blocks,
                dtype=dt, kernels=kernels, rngs=rngs)
        c, g = cfg.embed_dim, cfg.embedding_size
        dt = DTYPES[cfg.decoder_dtype]
        self.prompt_encoder = PromptEncoder(c, (g, g), (cfg.image_size, cfg.image_size), MASK_IN_CHANS,
                                            dtype=dt, rngs=rngs)
        # segment_anything's widths scale with the embedding: 256 -> mlp 2048, IoU head 256.
        self.mask_decoder = MaskDecoder(c, 3, 3, c, transformer_mlp_dim=8 * c, prompt_free=cfg.prompt_free,
                                        num_classes=cfg.num_classes, dtype=dt, kernels=kernels, rngs=rngs)
        # segment_anything's pixel_mean/pixel_std are non-persistent buffers (absent from
        # checkpoints); normalisation lives in `preprocess`.

    def embed(self, images: jax.Array, depth_chunk: Optional[int] = None) -> jax.Array:
        """Normalised images [B,H,W,3] -> image embeddings [B,h,w,C]."""
        if depth_chunk is not None:
            return self.image_encoder(images, depth_chunk=depth_chunk)
        return self.image_encoder(images)

    def decode(self, embeddings: jax.Array, points=None, boxes=None, mask_inputs=None,
               multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
        """Image embeddings [B,h,w,C] and one prompt set per image -> (low-res logits
        [B,4h,4w,K] float32, IoU predictions [B,K'] float32).

        points: (coords [B,N,2] in input-image pixels (x, y), labels [B,N]); boxes [B,4];
        mask_inputs [B,4h,4w,1]. Any combination or none. Ignored when prompt_free.
        """
        pe = self.prompt_encoder.get_dense_pe()
        if self.cfg.prompt_free:
            return self.mask_decoder(embeddings, pe, None, None, multimask_output)
        given = points is not None or boxes is not None or mask_inputs is not None
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs,
                                            batch_size=None if given else embeddings.shape[0])
        return self.mask_decoder(embeddings, pe, sparse, dense, multimask_output)

    def __call__(self, images: jax.Array, points=None, boxes=None, mask_inputs=None,
                 multimask_output: bool = False, depth_chunk: Optional[int] = None):
        """Normalised images [B,H,W,3] (see `preprocess`) -> (low-res logits [B,h,w,K],
        IoU predictions [B,K']). K: 1, 3 with multimask_output, num_classes when > 1."""
        return self.decode(self.embed(images, depth_chunk), points, boxes, mask_inputs, multimask_output)


def build_sam(cfg: SamConfig, *, rngs: nnx.Rngs) -> Sam:
    return Sam(cfg, rngs=rngs)


def count_params(model_or_state) -> int:
    """Number of scalars in nnx.Param leaves (buffers and BatchNorm statistics excluded).
    Accepts a module (also an abstract one from nnx.eval_shape) or an nnx State."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    total = 0
    for leaf in leaves:
        if isinstance(leaf, nnx.Variable):
            if not isinstance(leaf, nnx.Param):
                continue
            leaf = leaf.get_value()
        total += math.prod(np.shape(leaf)) if not hasattr(leaf, "shape") else math.prod(leaf.shape)
    return int(total)
