"""CHAOS abdominal federation: the CT and the MR part of the release as two clients."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedfms_jax.data import preprocess
from fedfms_jax.data.builders.base import Case, FederationBuilder
from fedfms_jax.data.errors import DataError
from fedfms_jax.data.registry import FEDERATIONS

# MR ground-truth grey levels of the release: liver 63, right kidney 126, left kidney 189, spleen 252.
MR_SEQUENCES = ("T2SPIR", "T1DUAL/InPhase", "T1DUAL/OutPhase")
MR_ORGANS = {"liver": (55, 70), "right_kidney": (110, 135), "left_kidney": (175, 200), "spleen": (240, 255)}


def natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise DataError(f"chaos: {path} is DICOM, which needs pydicom (pip install pydicom); or convert the "
                        "slices to PNG/TIF in <patient>/[T2SPIR/]images/") from None
    try:
        ds = pydicom.dcmread(str(path))
        return ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
            getattr(ds, "RescaleIntercept", 0))
    except Exception as e:
        raise DataError(f"cannot read DICOM {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None


def slice_files(folder: Path, phase: str = "") -> list[Path]:
    """Image slices of a series: images/ (PNG/TIF) or DICOM_anon/ (.dcm), in natural order;
    `phase` is the T1DUAL subfolder (InPhase / OutPhase)."""
    for sub, suffixes in (("images", preprocess.IMAGE_SUFFIXES), ("DICOM_anon", (".dcm", ""))):
        d = folder / sub / phase if phase else folder / sub
        if d.is_dir():
            files = [p for p in d.iterdir() if p.is_file() and p.suffix.lower() in suffixes]
            if files:
                return sorted(files, key=natural_key)
    return []


class FedfmsChaos(FederationBuilder):
    """CHAOS CT (liver) and MR (T2-SPIR by default); one class, the liver by default."""

    SITES = FEDERATIONS["chaos"].sites
    NUM_CLASSES = FEDERATIONS["chaos"].num_classes
    OPTIONS = {"organ": "liver", "mr_sequence": "T2SPIR"}  # or T1DUAL/InPhase, T1DUAL/OutPhase
    # val_split="original": no CHAOS script is published; split like the other volumes (n // 10 + 1)
    SPLIT_UNIT = "volume"
    LAYOUT = ("<manual_dir>/[CHAOS_Train_Sets/Train_Sets/]{CT,MR}/<patient>/ with CT/<patient>/{DICOM_anon/*.dcm "
              "or images/*.png|tif} + Ground/*.png and MR/<patient>/T2SPIR/{DICOM_anon or images} + Ground/*.png "
              "(T1DUAL: DICOM_anon/{InPhase,OutPhase}; DICOM needs pydicom; without it convert slices to PNG/TIF "
              "in images/, same subfolders)")
    SOURCE = "the CHAOS challenge, chaos.grand-challenge.org (zenodo.org/record/3431873)"

    def _modality_dirs(self, root: Path) -> dict[str, Path]:
        for base in (root, root / "Train_Sets", root / "CHAOS_Train_Sets" / "Train_Sets", root / "CHAOS_Train_Sets"):
            if (base / "CT").is_dir() and (base / "MR").is_dir():
                return {"CT": base / "CT", "MR": base / "MR"}
        raise self.missing(f"missing folders CT/ and MR/ under {root}")

    def discover(self, root: Path) -> dict[str, list[Case]]:
        organ, seq = self.option("organ"), self.option("mr_sequence")
        if organ not in MR_ORGANS:
            raise ValueError(f"organ must be one of {sorted(MR_ORGANS)}")
        if organ != "liver":
            raise ValueError("CHAOS CT is annotated for the liver only; organ must be 'liver' for the CT client")
        if seq not in MR_SEQUENCES:
            raise ValueError(f"mr_sequence must be one of {MR_SEQUENCES}")
        seq_dir, _, phase = seq.partition("/")
        out = {}
        for site, folder in self._modality_dirs(root).items():
            cases = []
            for patient in sorted((p for p in folder.iterdir() if p.is_dir()), key=natural_key):
                series = patient if site == "CT" else patient / seq_dir
                images, ground = slice_files(series, "" if site == "CT" else phase), sorted(
                    (p for p in (series / "Ground").glob("*") if p.suffix.lower() in preprocess.IMAGE_SUFFIXES),
                    key=natural_key)
                if not images:
                    raise self.missing(f"no slices in {series / 'DICOM_anon'} or {series / 'images'}")
                if len(images) != len(ground):
                    raise self.missing(f"{series}: {len(images)} image slices but {len(ground)} Ground masks")
                cases.append(Case(patient.name, self._loader(site, images, ground, organ)))
            if not cases:
                raise self.missing(f"no patient folders in {folder}")
            out[site] = cases
        return out

    @staticmethod
    def _loader(site: str, images: list[Path], ground: list[Path], organ: str):
        def load():
            vol = np.stack([read_dicom(p) if p.suffix.lower() in (".dcm", "") else
                            np.asarray(preprocess.read_image(p), np.float32) for p in images])
            if vol.ndim == 4:
                vol = vol[..., 0]
            vol = preprocess.clip_scale(vol)  # one window per series, as for the other MR/CT data
            lo, hi = MR_ORGANS[organ]
            for z, gpath in enumerate(ground):
                g = preprocess.read_image(gpath)
                g = g[..., 0] if g.ndim == 3 else g
                if g.shape != vol.shape[1:]:
                    raise DataError(f"chaos: {gpath} has shape {g.shape}, its slice {vol.shape[1:]}")
                fg = g > 0 if site == "CT" else (g >= lo) & (g <= hi)
                # No slice choice is published for CHAOS in the original: keep slices with the organ.
                if fg.any():
                    yield gpath.stem, vol[z], fg[..., None]
        return load
