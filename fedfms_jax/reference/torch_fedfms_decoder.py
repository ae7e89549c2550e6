"""PyTorch reference of FedFMS's SAM: the prompt-free mask decoder with `seg1`, and a
builder that assembles official segment_anything parts into the model the original trains.

Needs torch and segment-anything 1.0 (the `test`/`bench` extras); torchvision is not
needed (stand-ins are installed for the imports segment_anything makes but never uses).
"""
from __future__ import annotations

import importlib
import math
import sys
import types
from functools import partial
from typing import List, Optional, Tuple

import torch
from torch import nn

from fedfms_jax.reference.vit_table import TORCH_VIT_SIZES


def ensure_segment_anything_importable() -> None:
    """segment_anything imports torchvision (transforms.functional, ops.boxes) at package
    import but its model code never uses it; the CPU torch here cannot load PyPI's
    torchvision. Put empty stand-ins for whatever is missing; a real torchvision wins."""
    names = {
        "torchvision": (),
        "torchvision.transforms": (),
        "torchvision.transforms.functional": ("resize", "to_pil_image"),
        "torchvision.ops": (),
        "torchvision.ops.boxes": ("batched_nms", "box_area"),
    }
    for name, attrs in names.items():
        if name not in sys.modules:
            try:
                importlib.import_module(name)
                continue
            except ImportError:
                sys.modules[name] = types.ModuleType(name)
        mod = sys.modules[name]
        for attr in attrs:
            if not hasattr(mod, attr):
                setattr(mod, attr, None)
        parent, _, child = name.rpartition(".")
        if parent and not hasattr(sys.modules[parent], child):
            setattr(sys.modules[parent], child, mod)


ensure_segment_anything_importable()

from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    TwoWayTransformer,
)

# segment_anything's build_sam settings per encoder size (kwargs of build_torch_vit).
TORCH_VIT_SETTINGS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class FedFMSMaskDecoder(MaskDecoder):
    """segment_anything's MaskDecoder as FedFMS changes it.

    prompt_free: tokens are the IoU and mask tokens only (sparse prompts dropped) and the
    image embedding is not added to the dense prompt. num_classes > 1: `seg1`, a 1x1 conv,
    maps all mask-token masks to num_classes channels; the IoU prediction is still sliced.
    """

    def __init__(self, *, prompt_free: bool = True, num_classes: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.prompt_free = prompt_free
        self.num_classes = num_classes
        if num_classes > 1:
            self.seg1 = nn.Conv2d(self.num_mask_tokens, num_classes, 1)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                dense_prompt_embeddings, multimask_output: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe,
                                             sparse_prompt_embeddings, dense_prompt_embeddings)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        masks = self.seg1(masks) if self.num_classes > 1 else masks[:, sel]
        return masks, iou_pred[:, sel]

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
        if not self.prompt_free:
            return super().predict_masks(image_embeddings, image_pe,
                                         sparse_prompt_embeddings, dense_prompt_embeddings)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        if image_embeddings.shape[0] != tokens.shape[0]:
            src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
        else:
            src = image_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
        hyper_in_list: List[torch.Tensor] = [
            self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(self.num_mask_tokens)
        ]
        hyper_in = torch.stack(hyper_in_list, dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)


class TorchFedFMSSam(nn.Module):
    """Official-layout SAM (same state-dict keys) whose forward takes a batch of
    normalised images [B,3,H,W] and returns low-resolution logits [B,K,H/4,W/4]."""

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    def decode(self, image_embeddings, points=None, boxes=None, mask_inputs=None,
               multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """One prompt set per image (points = (coords [B,N,2], labels [B,N]), boxes [B,4],
        mask_inputs [B,1,h,w]); images are decoded one at a time as official Sam.forward does."""
        if getattr(self.mask_decoder, "prompt_free", False):
            # The original feeds a dummy point; the decoder then drops every prompt.
            b = image_embeddings.shape[0]
            points = (torch.zeros(b, 1, 2), torch.ones(b, 1, dtype=torch.int64))
            boxes = mask_inputs = None
        masks, ious = [], []
        for i in range(image_embeddings.shape[0]):
            pts = None if points is None else (points[0][i:i + 1], points[1][i:i + 1])
            sparse, dense = self.prompt_encoder(
                points=pts,
                boxes=None if boxes is None else boxes[i:i + 1],
                masks=None if mask_inputs is None else mask_inputs[i:i + 1],
            )
            m, q = self.mask_decoder(
                image_embeddings=image_embeddings[i:i + 1],
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks.append(m)
            ious.append(q)
        return torch.cat(masks), torch.cat(ious)

    def predict(self, images, points=None, boxes=None, mask_inputs=None, multimask_output=False):
        """-> (low-res logits [B,K,h,w], IoU predictions [B,K'])."""
        return self.decode(self.image_encoder(images), points, boxes, mask_inputs, multimask_output)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)[0]


def build_torch_fedfms_sam(variant: str = "vit_b", img_size: int = 1024, num_classes: int = 1,
                           prompt_free: bool = True, adapters: bool = False,
                           encoder: Optional[nn.Module] = None, *, embed_dim: Optional[int] = None,
                           pad_before_norm1: bool = True) -> TorchFedFMSSam:
    """Official segment_anything parts (randomly initialised) assembled as FedFMS uses them.

    variant: a key of fedfms_jax.reference.vit_table.TORCH_VIT_SIZES (vit_b/l/h with
    segment_anything's settings, vit_tiny for tests). adapters=True uses the MSA encoder
    of fedfms_jax.reference.torch_msa_encoder (with the originals' `pad_before_norm1`).
    `encoder` overrides both: any module mapping [B,3,H,W] to [B,C,H/16,W/16] (then
    `embed_dim` = C, default 256). Prompt encoder and decoder widths follow C as in
    segment_anything (mlp 8C, IoU head C; 256 -> 2048, 256).
    """
    if variant not in TORCH_VIT_SIZES:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(TORCH_VIT_SIZES)}")
    vcfg = TORCH_VIT_SIZES[variant]
    if img_size % vcfg.patch_size:
        raise ValueError(f"img_size {img_size} must be a multiple of the patch size {vcfg.patch_size}")
    if encoder is None:
        embed_dim = vcfg.out_chans
        if adapters:
            from fedfms_jax.reference.torch_msa_encoder import build_torch_msa_encoder

            encoder = build_torch_msa_encoder(variant, img_size, pad_before_norm1=pad_before_norm1)
        else:
            encoder = build_torch_vit(img_size=img_size, embed_dim=vcfg.embed_dim, depth=vcfg.depth,
                                      num_heads=vcfg.num_heads, global_attn_indexes=vcfg.global_attn_indexes,
                                      window_size=vcfg.window_size, patch_size=vcfg.patch_size,
                                      out_chans=vcfg.out_chans, mlp_ratio=vcfg.mlp_ratio)
    c = embed_dim or 256
    grid = img_size // vcfg.patch_size
    prompt_encoder = PromptEncoder(embed_dim=c, image_embedding_size=(grid, grid),
                                   input_image_size=(img_size, img_size), mask_in_chans=16)
    decoder_kwargs = dict(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=c, mlp_dim=8 * c, num_heads=8),
        transformer_dim=c, iou_head_depth=3, iou_head_hidden_dim=c,
    )
    if prompt_free or num_classes > 1:
        mask_decoder = FedFMSMaskDecoder(prompt_free=prompt_free, num_classes=num_classes, **decoder_kwargs)
    else:
        mask_decoder = MaskDecoder(**decoder_kwargs)
    return TorchFedFMSSam(encoder, prompt_encoder, mask_decoder).eval()


def build_torch_vit(*, img_size: int, embed_dim: int, depth: int, num_heads: int,
                    global_attn_indexes, window_size: int = 14, patch_size: int = 16,
                    out_chans: int = 256, mlp_ratio: float = 4.0) -> ImageEncoderViT:
    """segment_anything's ImageEncoderViT exactly as its build_sam configures it."""
    return ImageEncoderViT(
        depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=patch_size,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(global_attn_indexes),
        window_size=window_size, out_chans=out_chans,
    )


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter and float buffer with seeded random values of a sane
    scale (weights ~ 1/sqrt(fan_in), norms ~ 1, biases/positions ~ 0.1, tokens ~ 1), so
    parity tests exercise every weight, not the default init's zeros and ones."""
    gen = torch.Generator().manual_seed(seed)
    embedding_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    tensors = list(module.named_parameters()) + [
        (n, b) for n, b in module.named_buffers() if b.is_floating_point()
    ]
    for name, t in tensors:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("pixel_mean", "pixel_std"):
            continue
        noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        if id(t) in embedding_weights or "gaussian" in leaf:
            t.copy_(noise)  # tokens, prompt embeddings, Fourier matrix
        elif leaf == "bias" or "pos" in leaf:
            t.copy_(0.1 * noise)
        elif t.ndim == 1:  # norm scales
            t.copy_(1.0 + 0.1 * noise)
        else:
            fan_in = t.shape[1] * math.prod(t.shape[2:])
            t.copy_(noise / math.sqrt(fan_in))
    return module
