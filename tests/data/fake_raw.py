"""Writers of tiny fake raw files in each public release's layout (for builder tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def nifti(path: Path, data: np.ndarray) -> Path:
    import nibabel as nib
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))
    return path


def image(path: Path, data: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(data)).save(path, **kw)
    return path


def blob_volume(rng, shape, fg_slices, value=1):
    """MR-like volume [X,Y,Z] plus a label volume whose blob covers `fg_slices`."""
    x, y, z = shape
    vol = rng.normal(300, 60, size=shape).astype(np.float32)
    vol[0, 0, :] = 5000  # a hot pixel per slice: the 99th-percentile clip must remove it
    lab = np.zeros(shape, np.int16)
    for k in fg_slices:
        lab[x // 4: x // 2, y // 3: 2 * y // 3, k] = value
    vol[lab > 0] += 400
    return vol, lab


def blob_image(rng, h, w, rgb=True):
    img = rng.integers(0, 80, size=(h, w, 3) if rgb else (h, w), dtype=np.uint8)
    m = np.zeros((h, w), bool)
    m[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = True
    img[m] = 200
    return img, m


def prostate_site(root: Path, site: str, rng, cases: int = 3, shape=(20, 24, 5)) -> Path:
    """One prostate site in the SAML release layout: <root>/<site>/CaseNN.nii.gz +
    CaseNN_segmentation.nii.gz."""
    for c in range(cases):
        vol, lab = blob_volume(rng, shape, fg_slices=[1, 2, 3])
        nifti(root / site / f"Case{c:02d}.nii.gz", vol)
        nifti(root / site / f"Case{c:02d}_segmentation.nii.gz", lab)
    return root / site
