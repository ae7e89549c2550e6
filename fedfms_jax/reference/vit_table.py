"""The ViT encoder sizes the PyTorch references build, in plain Python.

The reference side imports nothing from the JAX side, so it keeps its own copy of the
table (segment_anything's build_sam settings plus the small test variant); a test checks
it against the JAX model's `VIT_CONFIGS`.
"""
from __future__ import annotations

from typing import NamedTuple


class TorchViTSize(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    out_chans: int = 256
    mlp_ratio: float = 4.0


TORCH_VIT_SIZES = {
    "vit_b": TorchViTSize(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": TorchViTSize(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": TorchViTSize(1280, 32, 16, (7, 15, 23, 31)),
    "vit_tiny": TorchViTSize(64, 4, 2, (1, 3), window_size=4, out_chans=32),
}


def closest_numbers(n: int) -> tuple[int, int]:
    """The MSA original's factorisation of a depth chunk into a (dh, dw) grid
    (not the most square one: 4 -> (1, 4))."""
    a, b = int(n**0.5), int(n**0.5) + 1
    while a * b != n:
        if a * b < n:
            b += 1
        else:
            a -= 1
    return a, b
