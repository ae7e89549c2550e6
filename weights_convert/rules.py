"""The table that maps Flax parameter paths to PyTorch state-dict keys.

Flax modules in `fedfms_jax.models` are named exactly like the PyTorch modules they
port (lists of submodules are `nnx.List`, so `blocks.3` is the path `("blocks", 3)`).
A PyTorch key is therefore the Flax path joined with dots, with the leaf renamed by
the table below; the array is transposed by the leaf's kind. No per-model exceptions.
"""
from __future__ import annotations

import numpy as np

# Flax leaf name -> PyTorch leaf name. Leaves not listed keep their name
# (pos_embed, rel_pos_h, LayerNorm2d's weight/bias, buffers, ...).
LEAF_TO_TORCH = {
    "kernel": "weight",  # nnx.Linear / nnx.Conv / nnx.ConvTranspose
    "scale": "weight",  # nnx.LayerNorm / nnx.BatchNorm
    "embedding": "weight",  # nnx.Embed
    "mean": "running_mean",  # nnx.BatchNorm
    "var": "running_var",  # nnx.BatchNorm
}

# PyTorch keys that carry no Flax value: consumed on import, recreated on export.
TORCH_ONLY_SUFFIXES = ("num_batches_tracked",)


def torch_key(path: tuple) -> str:
    """('image_encoder', 'blocks', 0, 'attn', 'qkv', 'kernel') -> 'image_encoder.blocks.0.attn.qkv.weight'."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, LEAF_TO_TORCH.get(leaf, leaf)])


def to_flax(path: tuple, value: np.ndarray) -> np.ndarray:
    """PyTorch tensor (as numpy) -> Flax array for the leaf at `path`."""
    if str(path[-1]) != "kernel":
        return value
    if value.ndim == 2:  # Linear: (out, in) -> (in, out)
        return value.T
    if value.ndim == 4:
        # Conv2d OIHW -> HWIO. ConvTranspose2d stores (in, out, kh, kw); Flax's
        # ConvTranspose with transpose_kernel=True wants (kh, kw, out, in): same permutation.
        return value.transpose(2, 3, 1, 0)
    raise ValueError(f"kernel at {torch_key(path)} has unexpected rank {value.ndim}")


def to_torch(path: tuple, value: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax`."""
    if str(path[-1]) != "kernel":
        return value
    if value.ndim == 2:
        return value.T
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    raise ValueError(f"kernel at {torch_key(path)} has unexpected rank {value.ndim}")
