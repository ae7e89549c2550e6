"""What model a checkpoint is, read from its keys and shapes alone.

SAM ViT-B/L/H (and MedSAM, which is ViT-B) are told apart by embedding width and
block count; TinyViT encoders (MobileSAM, TinySAM, LiteMedSAM) by their `layers.*`
stages, with every setting inferred from shapes. The input size comes from the
absolute pos-embed grid (ViT) or the TinyViT's patch/merge strides; MSA adapters from
`*_Adapter.*` keys; the FedFMS class count from the decoder's `seg1` conv.

`family_of` then names what produced the checkpoint and the numerics that family's own
code computes with (window padding order, prompts, pixel normalisation), which a
conversion uses unless told otherwise.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from weights_convert.tensorfile import CheckpointError

ENCODERS = ("vit_b", "vit_l", "vit_h", "vit_tiny", "tiny_vit")
_ADAPTER = re.compile(r"^image_encoder\..*\.(Space|MLP|Depth)_Adapter\.")
_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Detected:
    encoder: str  # one of ENCODERS
    image_size: int
    adapters: bool
    num_classes: int
    tiny_vit: Any = None  # TinyViTConfig for encoder == "tiny_vit"
    embed_dim: int | None = None  # ViT width
    depth: int | None = None  # ViT blocks
    seg1: bool = False  # the FedFMS decoder's class head is in the checkpoint (even for 1 class)

    def describe(self) -> str:
        extra = f", {self.depth} blocks x {self.embed_dim}" if self.embed_dim else ""
        return (f"{self.encoder} at {self.image_size}x{self.image_size}{extra}, "
                f"adapters={'yes' if self.adapters else 'no'}, classes={self.num_classes}")


def shapes_of(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(s) for s in v.shape) for k, v in state_dict.items()}


def _vit_configs() -> dict:
    from fedfms_jax.models.image_encoder import VIT_CONFIGS

    return VIT_CONFIGS


def _detect_vit(shapes: Mapping[str, tuple], forced: str | None) -> tuple[str, int, int, int]:
    proj = shapes["image_encoder.patch_embed.proj.weight"]  # (D, C, p, p)
    dim, patch = proj[0], proj[-1]
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))), default=-1)
    matches = [name for name, c in _vit_configs().items() if (c.embed_dim, c.depth) == (dim, depth)]
    if forced is not None:
        if forced not in matches:
            raise CheckpointError(
                f"--variant {forced} does not fit the checkpoint: its image encoder has {depth} blocks "
                f"of width {dim}"
            )
        name = forced
    elif matches:
        name = matches[0]
    else:
        known = ", ".join(f"{n} ({c.depth} x {c.embed_dim})" for n, c in _vit_configs().items())
        raise CheckpointError(f"unknown ViT image encoder: {depth} blocks of width {dim}; known: {known}")
    if "image_encoder.pos_embed" in shapes:
        grid = shapes["image_encoder.pos_embed"][1]
    else:  # no absolute pos-embed: a global-attention block's rel-pos table spans 2*grid-1
        cfg = _vit_configs()[name]
        rel = shapes.get(f"image_encoder.blocks.{cfg.global_attn_indexes[0]}.attn.rel_pos_h")
        if rel is None:
            raise CheckpointError("cannot tell the input size: no pos_embed and no global rel_pos table")
        grid = (rel[0] + 1) // 2
    return name, grid * patch, dim, depth


def detect(state_dict: Mapping[str, Any], variant: str = "auto") -> Detected:
    """Describe the SAM-family model whose state dict this is; `variant` forces the encoder."""
    if variant not in ("auto", *ENCODERS):
        raise CheckpointError(f"unknown variant {variant!r}; choose auto or one of {', '.join(ENCODERS)}")
    shapes = shapes_of(state_dict)
    for part in ("image_encoder.", "prompt_encoder.", "mask_decoder."):
        if not any(k.startswith(part) for k in shapes):
            sample = ", ".join(sorted(shapes)[:5])
            raise CheckpointError(f"not a SAM-family checkpoint: no {part}* keys (first keys: {sample})")
    forced = None if variant == "auto" else variant
    adapters = any(_ADAPTER.match(k) for k in shapes)
    seg1 = shapes.get("mask_decoder.seg1.weight")
    num_classes = int(seg1[0]) if seg1 is not None else 1
    has_seg1 = seg1 is not None

    if "image_encoder.patch_embed.seq.0.c.weight" in shapes:
        if forced not in (None, "tiny_vit"):
            raise CheckpointError(f"--variant {forced} does not fit the checkpoint: its image encoder is a TinyViT")
        from fedfms_jax.models.tiny_vit import infer_tiny_vit_config

        # Adapter keys are not TinyViT settings: infer from the base model's keys.
        base = {k: v for k, v in shapes.items() if not _ADAPTER.match(k)}
        try:
            cfg = infer_tiny_vit_config(base)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"TinyViT image encoder with unreadable settings: {e}") from None
        return Detected("tiny_vit", int(cfg.img_size), adapters, num_classes, tiny_vit=cfg, seg1=has_seg1)
    if "image_encoder.patch_embed.proj.weight" in shapes:
        if forced == "tiny_vit":
            raise CheckpointError("--variant tiny_vit does not fit the checkpoint: its image encoder is a ViT")
        name, size, dim, depth = _detect_vit(shapes, forced)
        return Detected(name, int(size), adapters, num_classes, embed_dim=int(dim), depth=int(depth),
                        seg1=has_seg1)
    raise CheckpointError(
        "unknown image encoder: neither image_encoder.patch_embed.proj.weight (ViT) nor "
        "image_encoder.patch_embed.seq.0.c.weight (TinyViT) is present"
    )


def is_adapter_key(key: str) -> bool:
    return bool(_ADAPTER.match(key))


# ------------------------------------------------------------------ families

@dataclasses.dataclass(frozen=True)
class Numerics:
    """How a family's own code runs its model; a conversion's defaults."""

    pad_before_norm1: bool  # ViT windows zero-padded before norm1 (MSA/FedFMS) or after (SAM)
    prompt_free: bool  # FedFMS: dummy prompt, the decoder drops prompt embeddings
    pixel_norm: str  # "sam": SAM's mean/std; "unit": pixels / 255 (or min-max to [0, 1])


NUMERICS = tuple(f.name for f in dataclasses.fields(Numerics))  # also SamConfig field names


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    evidence: str  # what in the checkpoint says so
    numerics: Numerics
    vit: bool  # the padding order is a choice only for ViT encoders

    def describe(self, chosen: Mapping[str, Any] | None = None) -> str:
        """One line: what was detected and the numerics chosen (the family's unless
        `chosen` says otherwise; such choices are marked as set by a flag)."""
        def show(name: str) -> str:
            default = getattr(self.numerics, name)
            value = default if chosen is None else chosen[name]
            if name == "pad_before_norm1" and not self.vit:
                return f"{name}=n/a"
            text = ("on" if value else "off") if isinstance(value, bool) else value
            if value == default:
                return f"{name}={text}"
            shown = ("on" if default else "off") if isinstance(default, bool) else default
            return f"{name}={text} (flag; detected {shown})"

        return f"detected: {self.name} ({self.evidence}) -> " + ", ".join(show(n) for n in NUMERICS)


_SAM_NUMERICS = Numerics(pad_before_norm1=False, prompt_free=False, pixel_norm="sam")
_VIT_NAMES = {"vit_b": "ViT-B", "vit_l": "ViT-L", "vit_h": "ViT-H", "vit_tiny": "ViT (test size)"}


def _tiny_vit_preset(det: Detected) -> str | None:
    from fedfms_jax.models.tiny_vit import TINY_VIT_PRESETS

    for name, preset in TINY_VIT_PRESETS.items():
        if dataclasses.replace(det.tiny_vit, img_size=preset.img_size) == preset:
            return name
    return None


def family_of(det: Detected) -> Family:
    """What produced the checkpoint, told from its keys and shapes, and its numerics.

    FedFMS always builds `seg1` (unused for one class) and runs prompt-free on x / 255;
    its ViT blocks are MSA blocks. MSA pads windows before norm1 but otherwise computes
    as SAM. LiteMedSAM scales images to [0, 1] and takes box prompts. Official SAM,
    MedSAM (a ViT-B fine-tune with official SAM's keys and shapes), MobileSAM and TinySAM
    (the same TinyViT) cannot be told apart further and get official SAM's numerics.
    """
    vit = det.encoder != "tiny_vit"
    encoder = _VIT_NAMES.get(det.encoder, det.encoder) if vit else "TinyViT"
    size = f"{det.image_size} px"
    body = f"{encoder} with MSA adapters" if det.adapters else encoder
    msa_pad = vit and det.adapters  # the MSA block's order; TinyViT has no such choice
    if det.seg1:
        classes = f"{det.num_classes} class{'es' if det.num_classes > 1 else ''}"
        return Family("FedFMS", f"{body}, seg1 head, {classes}, {size}", Numerics(msa_pad, True, "unit"), vit)
    if det.adapters:
        return Family("MSA", f"{body}, {size}", Numerics(msa_pad, False, "sam"), vit)
    if vit:
        name = "SAM or MedSAM" if det.encoder == "vit_b" else "SAM"
        return Family(name, f"{encoder}, {size}", _SAM_NUMERICS, vit)
    preset = _tiny_vit_preset(det)
    if preset == "lite_medsam":
        return Family("LiteMedSAM", f"TinyViT with 1x1 patch convs, {size}", Numerics(False, False, "unit"), vit)
    if preset in ("mobile_sam", "tiny_sam"):
        return Family("MobileSAM or TinySAM", f"TinyViT-5M, {size}", _SAM_NUMERICS, vit)
    return Family("TinyViT SAM", f"TinyViT of another layout, {size}", _SAM_NUMERICS, vit)


def unused_keys(det: Detected, keys) -> list[str]:
    """Checkpoint entries the family's model never reads: FedFMS's one-class `seg1`."""
    if det.seg1 and det.num_classes == 1:
        return [k for k in keys if k.startswith("mask_decoder.seg1.")]
    return []
