"""A procedural federation for tests and benchmarks: any size, no files, fully seeded.

Each image holds a few bright or dark shapes (ellipses for class 0, rectangles for
class 1, alternating for more classes) on a textured background. Every site has its own
appearance: background level, colour tint, texture frequency and orientation, shape
contrast and noise, so that a model trained on some sites meets a real shift on another.
Examples are generated on access from (seed, site, index), so two sources built with the
same arguments return identical arrays.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class SiteStyle:
    background: float  # mean grey level 0..255
    tint: tuple[float, float, float]  # per-channel gain
    texture_freq: float  # cycles per image
    texture_angle: float  # radians
    texture_amp: float
    contrast: float  # foreground minus background, signed
    noise: float


def site_style(seed: int, site: int) -> SiteStyle:
    rng = np.random.default_rng([seed, site, 7])
    return SiteStyle(
        background=float(rng.uniform(40, 150)),
        tint=tuple(float(t) for t in rng.uniform(0.7, 1.3, size=3)),
        texture_freq=float(rng.uniform(2, 12)),
        texture_angle=float(rng.uniform(0, np.pi)),
        texture_amp=float(rng.uniform(5, 30)),
        contrast=float(rng.choice([-1, 1]) * rng.uniform(40, 90)),
        noise=float(rng.uniform(2, 15)),
    )


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[:, None], coords[None, :]


def render(seed: int, site: int, index: int, image_size: int, num_classes: int) -> dict:
    """One synthetic example as {"image": uint8 [S,S,3], "mask": uint8 [S/4,S/4,C], "case_id"}."""
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
    style = site_style(seed, site)
    rng = np.random.default_rng([seed, site, index, 11])
    yy, xx = _grid(image_size)
    s = image_size
    # Separable texture: sin(a*x + b*y) = sin(a x)cos(b y) + cos(a x)sin(b y) keeps it O(S^2) cheap.
    w = 2 * np.pi * style.texture_freq
    a, b = w * np.cos(style.texture_angle), w * np.sin(style.texture_angle)
    phase = rng.uniform(0, 2 * np.pi)
    grey = (np.float32(style.background) + np.float32(style.texture_amp) * (
        np.sin(a * xx + phase) * np.cos(b * yy) + np.cos(a * xx + phase) * np.sin(b * yy))).astype(np.float32)
    masks = np.zeros((num_classes, s, s), dtype=bool)
    for c in range(num_classes):
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0.15, 0.85, size=2)
            ry, rx = rng.uniform(0.05, 0.2, size=2)
            # Evaluate each shape on its bounding box only.
            r0, r1 = int(max(0, (cy - ry) * s - 1)), int(min(s, (cy + ry) * s + 2))
            c0, c1 = int(max(0, (cx - rx) * s - 1)), int(min(s, (cx + rx) * s + 2))
            y, x = yy[r0:r1], xx[:, c0:c1]
            if c % 2 == 0:
                shape = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1.0
            else:
                shape = (np.abs(y - cy) < ry) & (np.abs(x - cx) < rx)
            masks[c, r0:r1, c0:c1] |= shape
    fg = masks.any(axis=0)
    grey[fg] += np.float32(style.contrast)
    grey += rng.standard_normal((s, s), dtype=np.float32) * np.float32(style.noise)
    image = grey[..., None] * np.asarray(style.tint, np.float32)
    image = np.clip(image, 0, 255, out=image).astype(np.uint8)
    # Nearest-neighbour downsample to SAM's low-res logits size (S/4), centre sample of each 4x4 cell.
    mask = masks[:, 2::4, 2::4].transpose(1, 2, 0).astype(np.uint8)
    return {"image": image, "mask": mask, "case_id": f"site{site}_img{index:05d}"}


class SyntheticSource:
    """Random-access source (len + __getitem__) of one synthetic site."""

    def __init__(self, *, seed: int, site: int, indices: range | np.ndarray, image_size: int,
                 num_classes: int):
        self.seed, self.site = seed, site
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_size, self.num_classes = image_size, num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return render(self.seed, self.site, int(self.indices[i]), self.image_size, self.num_classes)

    def __repr__(self) -> str:
        return f"SyntheticSource(site={self.site}, n={len(self)}, size={self.image_size})"


def site_sizes(num_sites: int, images_per_site: int | list[int]) -> list[int]:
    if isinstance(images_per_site, int):
        return [images_per_site] * num_sites
    if len(images_per_site) != num_sites:
        raise ValueError("images_per_site must have one entry per site")
    return list(images_per_site)
