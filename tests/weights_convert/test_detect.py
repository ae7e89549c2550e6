"""Variant detection from keys and shapes (official architectures on torch's meta device:
real key sets and shapes, no memory)."""
import types

import pytest

from tests.weights_convert._sam_import import import_segment_anything
from weights_convert.detect import detect
from weights_convert.tensorfile import CheckpointError

import torch  # noqa: E402


def _shapes(module) -> dict:
    return {k: types.SimpleNamespace(shape=tuple(v.shape)) for k, v in module.state_dict().items()}


def _official(variant: str, img_size: int = 1024) -> dict:
    import_segment_anything()
    from segment_anything import sam_model_registry
    from segment_anything.modeling import ImageEncoderViT

    with torch.device("meta"):
        sam = sam_model_registry[variant]()
        if img_size != 1024:
            enc = sam.image_encoder
            sam.image_encoder = ImageEncoderViT(
                img_size=img_size, embed_dim=enc.patch_embed.proj.out_channels, depth=len(enc.blocks),
                num_heads=enc.blocks[0].attn.num_heads, use_rel_pos=True, window_size=14,
                global_attn_indexes=[i for i, b in enumerate(enc.blocks) if b.window_size == 0], out_chans=256)
    return _shapes(sam)


@pytest.mark.parametrize("variant,dim,depth", [("vit_b", 768, 12), ("vit_l", 1024, 24), ("vit_h", 1280, 32)])
def test_official_sam_variants(variant, dim, depth):
    det = detect(_official(variant))
    assert (det.encoder, det.image_size, det.adapters, det.num_classes) == (variant, 1024, False, 1)
    assert (det.embed_dim, det.depth) == (dim, depth)


def test_input_size_from_pos_embed_and_rel_pos():
    sd = _official("vit_b", 512)
    assert detect(sd).image_size == 512
    del sd["image_encoder.pos_embed"]  # then the global blocks' rel-pos tables tell it
    assert detect(sd).image_size == 512


def test_adapters_and_classes():
    sd = _official("vit_b")
    ns = types.SimpleNamespace
    sd["image_encoder.blocks.0.Space_Adapter.D_fc1.weight"] = ns(shape=(192, 768))
    sd["mask_decoder.seg1.weight"] = ns(shape=(2, 4, 1, 1))
    sd["mask_decoder.seg1.bias"] = ns(shape=(2,))
    det = detect(sd)
    assert det.adapters and det.num_classes == 2 and det.encoder == "vit_b"


def test_forced_variant_must_fit():
    sd = _official("vit_b")
    assert detect(sd, "vit_b").encoder == "vit_b"
    with pytest.raises(CheckpointError, match="12 blocks of width 768"):
        detect(sd, "vit_l")
    with pytest.raises(CheckpointError, match="TinyViT|ViT"):
        detect(sd, "tiny_vit")
    with pytest.raises(CheckpointError, match="unknown variant"):
        detect(sd, "vit_x")


def test_not_sam_and_unknown_width():
    sd = _official("vit_b")
    with pytest.raises(CheckpointError, match="mask_decoder"):
        detect({k: v for k, v in sd.items() if not k.startswith("mask_decoder.")})
    odd = {k: v for k, v in sd.items() if not k.startswith("image_encoder.blocks.11.")}
    with pytest.raises(CheckpointError, match="11 blocks of width 768"):
        detect(odd)


def test_lite_medsam_is_a_tiny_vit():
    from fedfms_jax.data.assets import LITE_MEDSAM, fetch
    from weights_convert.pth import load_checkpoint

    det = detect(load_checkpoint(fetch(LITE_MEDSAM)))
    assert det.encoder == "tiny_vit" and det.image_size == 256 and not det.adapters
    assert det.tiny_vit.patch_kernel_size == 1 and det.tiny_vit.depths == (2, 2, 6, 2)
