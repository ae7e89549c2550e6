"""Shared preprocessing: reading raw files, intensity scaling, resizing, splitting by patient.

Follows the original's recipe: MR/CT intensities clipped at the 99th percentile and scaled to
0-255, grey -> 3 channels, image resized bilinearly to S, mask by nearest neighbour to S/4
(PIL's resampling, or the original's cv2 rules reimplemented: `RESIZES`).
Every reader raises DataError naming the file it could not read.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from fedfms_jax.data.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# -- readers ------------------------------------------------------------------------------
def read_image(path: Path) -> np.ndarray:
    """An image file (PNG/JPG/BMP/TIF) as a numpy array, uint8 where the file is 8-bit."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile
            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            if im.mode in ("P", "PA"):  # palette: keep the indices (label maps), else colours
                return np.asarray(im)
            if im.mode in ("I;16", "I;16B", "I"):
                return np.asarray(im)
            return np.asarray(im.convert("RGB") if im.mode in ("CMYK", "YCbCr", "LA") else im)
    except DataError:
        raise
    except Exception as e:  # PIL/tifffile raise many types for truncated or foreign files
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None


def read_nifti(path: Path) -> np.ndarray:
    """A NIfTI volume as float32 [X, Y, Z] in its closest canonical (RAS+) orientation.

    Reorienting as viewers do makes a volume stored flipped or permuted give the same slices
    in training and in `predict` (a canonical file is returned as stored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        import nibabel as nib
        img = nib.load(str(path))
        if len(img.shape) >= 3:
            img = nib.as_closest_canonical(img)
        vol = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise DataError(f"cannot read NIfTI volume {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None
    if vol.ndim == 4 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise DataError(f"NIfTI volume {path} has shape {vol.shape}, expected 3-D")
    return vol


def read_npy(path: Path, mmap: bool = True) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:  # allow_pickle stays False: object arrays from unknown files are refused
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None


# How a volume's axial slices are laid out: "yx" puts Y on the rows, as viewers show them;
# "xy" keeps nibabel's [X, Y] (the original FedFMS code's slices).
SLICE_ORIENTATIONS = {"yx": (2, 1, 0), "xy": (2, 0, 1)}


def axial_slices(vol: np.ndarray, orientation: str = "yx") -> np.ndarray:
    """[X, Y, Z] NIfTI volume -> [Z, rows, cols] stack of axial slices."""
    if orientation not in SLICE_ORIENTATIONS:
        raise ValueError(f"slice orientation must be one of {sorted(SLICE_ORIENTATIONS)}, got {orientation!r}")
    return np.transpose(vol, SLICE_ORIENTATIONS[orientation])


def volume_of_slices(slices: np.ndarray, orientation: str = "yx") -> np.ndarray:
    """The inverse of `axial_slices`: [Z, rows, cols] -> [X, Y, Z]."""
    return np.transpose(slices, np.argsort(SLICE_ORIENTATIONS[orientation]))


# -- intensities --------------------------------------------------------------------------
def clip_scale(vol: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Clip at the given percentile, scale [min, clip] to 0-255 uint8 (one window per volume)."""
    vol = np.asarray(vol, dtype=np.float32)
    low = float(vol.min())
    high = float(np.percentile(vol, percentile))
    if high <= low:
        return np.zeros(vol.shape, np.uint8)
    out = (np.clip(vol, low, high) - low) * (255.0 / (high - low))
    return np.round(out).astype(np.uint8)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Bring an 8-bit, 16-bit or float image to uint8 (16-bit / float by clip_scale)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    return clip_scale(image)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """[H,W] or [H,W,1|2|3|4] uint8 -> [H,W,3] (grey repeated, alpha dropped)."""
    image = to_uint8(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] in (1, 2):
        return np.repeat(image[..., :1], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


# -- geometry -----------------------------------------------------------------------------
# How images and masks are resized: "pil" (PIL bilinear, antialiased when shrinking; masks
# sampled at pixel centres) or "cv2" (the original's cv2.resize: INTER_LINEAR without
# antialiasing, INTER_NEAREST taking floor(dst * scale)), reimplemented in numpy.
RESIZES = ("pil", "cv2")


def resize_image(image: np.ndarray, size: int, method: str = "pil") -> np.ndarray:
    """[H,W,3] uint8 -> [size,size,3] uint8, bilinear."""
    if method == "cv2":
        return resize_linear_cv2(image, size)
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int, method: str = "pil") -> np.ndarray:
    """[H,W,C] {0,1} -> [size,size,C] uint8 by nearest neighbour."""
    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[..., None]
    h, w = mask.shape[:2]
    if method == "cv2":
        rows, cols = nearest_index_cv2(h, size), nearest_index_cv2(w, size)
    else:  # pixel-centre sampling
        rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return np.ascontiguousarray((mask[rows][:, cols] != 0).astype(np.uint8))


def nearest_index_cv2(src: int, dst: int) -> np.ndarray:
    """cv2 INTER_NEAREST's source index of each output pixel: floor(dst * src/dst), no half-pixel offset."""
    return np.minimum(np.floor(np.arange(dst) * (src / dst)).astype(np.int64), src - 1)


def linear_taps_cv2(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR's two source indices and the second one's weight per output pixel:
    half-pixel centres, src = (dst + 0.5) * scale - 0.5, clamped at the borders."""
    pos = (np.arange(dst) + 0.5) * (src / dst) - 0.5
    lo = np.floor(pos).astype(np.int64)
    return np.clip(lo, 0, src - 1), np.clip(lo + 1, 0, src - 1), pos - lo


def resize_linear_cv2(image: np.ndarray, size: int) -> np.ndarray:
    """[H,W(,C)] uint8 -> [size,size(,C)] uint8 like cv2.resize(INTER_LINEAR): no antialiasing
    when shrinking. Weights are exact here (cv2 rounds them to 1/2048): within 1 grey level."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    y0, y1, fy = linear_taps_cv2(h, size)
    x0, x1, fx = linear_taps_cv2(w, size)
    shape = (-1,) + (1,) * (image.ndim - 1)
    src = image.astype(np.float64)
    rows = src[y0] * (1.0 - fy.reshape(shape)) + src[y1] * fy.reshape(shape)
    shape = (1, -1) + (1,) * (image.ndim - 2)
    out = rows[:, x0] * (1.0 - fx.reshape(shape)) + rows[:, x1] * fx.reshape(shape)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def example(image: np.ndarray, mask: np.ndarray, image_size: int, case_id: str, resize: str = "pil") -> dict:
    """A finished example: RGB image at S, binary mask at S/4."""
    return {"image": resize_image(to_rgb(image), image_size, resize),
            "mask": resize_mask(mask, image_size // 4, resize), "case_id": case_id}


# -- files and splits ---------------------------------------------------------------------
def list_images(folder: Path, exclude: Iterable[str] = ()) -> list[Path]:
    exclude = tuple(exclude)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not any(x in p.name for x in exclude))


def find_by_stem(folder: Path, stem: str, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> Path:
    for suf in suffixes:
        for cand in (folder / f"{stem}{suf}", folder / f"{stem}{suf.upper()}"):
            if cand.is_file():
                return cand
    raise DataError(f"missing mask for {stem}: expected {folder / stem}.png (or .tif/.bmp/.jpg)")


def patient_of(stem: str) -> str:
    """Patient key of a 2-D slice file: a TCGA barcode's patient ('TCGA-XX-XXXX'), else the
    name before a separated trailing slice number ('pat07_slice_034' -> 'pat07'), else the name."""
    if stem.upper().startswith("TCGA-") and len(stem) >= 12:
        return stem[:12]
    m = re.match(r"^(.+?)[_\-. ]+(?:slice[_\-]?|z)?\d+$", stem, re.IGNORECASE)
    return m.group(1) if m else stem


def split_cases(case_ids: Sequence[str], val_fraction: float, seed: int, site: str) -> tuple[set, set]:
    """Deterministic patient-level split: order cases by a seeded hash, the first
    max(1, round(f * n)) are validation (none when a site has a single case)."""
    unique = sorted(set(case_ids))
    if len(unique) < 2 or val_fraction <= 0:
        return set(unique), set()
    key = lambda c: hashlib.sha256(f"{seed}/{site}/{c}".encode()).hexdigest()  # noqa: E731
    ordered = sorted(unique, key=key)
    n_val = min(len(unique) - 1, max(1, int(round(val_fraction * len(unique)))))
    return set(ordered[n_val:]), set(ordered[:n_val])


# How each site's validation part is chosen: "patient" (split_cases: patient-disjoint,
# max(1, round(10%))) or "original" (the FedFMS scripts: int(0.1 * n) random images of
# 2-D data, n // 10 + 1 random volumes of volume data).
VAL_SPLITS = ("patient", "original")


def original_val_count(n: int, unit: str) -> int:
    """How many of a site's n units the original moves to validation ("image" | "volume")."""
    if unit == "volume":
        return min(n, n // 10 + 1)  # divide_val_nii.py: random.sample(volumes, n // 10 + 1)
    if unit == "image":
        return int(0.1 * n)         # divide_val.py: int(len(images) * 0.1); n < 10 -> none
    raise ValueError(f"split unit must be 'image' or 'volume', got {unit!r}")


def split_original(unit_ids: Sequence[str], unit: str, seed: int, site: str) -> tuple[list[int], list[int]]:
    """(train, val) positions of a site's units under the original's rule; which units go
    to validation is a seeded hash order (the original's random.sample cannot be replayed)."""
    key = lambda i: hashlib.sha256(f"{seed}/{site}/{unit_ids[i]}/{i}".encode()).hexdigest()  # noqa: E731
    ordered = sorted(range(len(unit_ids)), key=key)
    n_val = original_val_count(len(unit_ids), unit)
    return sorted(ordered[n_val:]), sorted(ordered[:n_val])


def sanitize(name: str) -> str:
    """Site name -> TFDS split-name prefix ('ISBI_1.5' -> 'isbi_1_5')."""
    out = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return f"site{out}" if out[:1].isdigit() else out  # split names must not start with a digit
