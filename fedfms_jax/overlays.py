"""Overlay PNGs: a validation image with its ground truth and the predicted mask.

Prediction (logit > 0) is tinted red, the ground-truth outline drawn green; for
two-class data the second class uses blue / yellow. Masks are upsampled (nearest)
to the image size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

_PRED = np.array([[255, 0, 0], [0, 96, 255]], np.float32)
_GT = np.array([[0, 255, 0], [255, 255, 0]], np.uint8)


def _upsample(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = mask.shape
    rows = (np.arange(size[0]) * h // size[0])
    cols = (np.arange(size[1]) * w // size[1])
    return mask[rows][:, cols]


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def render(image: np.ndarray, gt: np.ndarray | None, logits: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """image uint8 [H,W,3]; gt [h,w,K] or None; logits [h',w',K] -> uint8 [H,W,3]."""
    out = np.asarray(image, np.float32).copy()
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    size = out.shape[:2]
    logits = np.asarray(logits)
    for k in range(logits.shape[-1]):
        pred = _upsample(logits[..., k] > 0, size)
        out[pred] = (1 - alpha) * out[pred] + alpha * _PRED[k % 2]
    out = out.clip(0, 255).astype(np.uint8)
    if gt is not None:
        gt = np.asarray(gt)
        gt = gt[..., None] if gt.ndim == 2 else gt
        for k in range(gt.shape[-1]):
            out[_outline(_upsample(gt[..., k] > 0, size))] = _GT[k % 2]
    return out


def save_overlays(directory: Path, site: str, tag: str, images, gts, logits) -> list[Path]:
    """Write one PNG per image as <directory>/<site>_<tag>_<i>.png; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in site)
    for i, (img, gt, lg) in enumerate(zip(images, gts, logits)):
        path = directory / f"{safe}_{tag}_{i}.png"
        Image.fromarray(render(img, gt, lg)).save(path)
        paths.append(path)
    return paths
