"""FeTS2022 brain-tumour federation: institutions 1, 6, 18 and 21 of the official partitioning."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedfms_jax.data import preprocess
from fedfms_jax.data.builders.base import Case, FederationBuilder
from fedfms_jax.data.errors import DataError
from fedfms_jax.data.registry import FEDERATIONS

MODALITIES = ("flair", "t1", "t1ce", "t2")


def read_partitioning(path: Path) -> dict[str, list[str]]:
    """partitioning_*.csv (Partition_ID,Subject_ID) -> partition id -> subject ids."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not rows or not {"Partition_ID", "Subject_ID"} <= set(rows[0]):
        raise DataError(f"{path} needs the columns Partition_ID,Subject_ID")
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(str(r["Partition_ID"]).strip(), []).append(str(r["Subject_ID"]).strip())
    return out


def _find(folder: Path, subject: str, kind: str) -> Path:
    for name in (f"{subject}_{kind}.nii.gz", f"{subject}_{kind}.nii"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"fets: missing file {folder / subject}_{kind}.nii.gz")


class FedfmsFets(FederationBuilder):
    """Multi-institutional glioma MRI; one class, the tumour core (labels 1 and 4), as the original."""

    SITES = FEDERATIONS["fets"].sites
    NUM_CLASSES = FEDERATIONS["fets"].num_classes
    OPTIONS = {"modality": "t1ce"}
    SPLIT_UNIT = "volume"  # val_split="original": the original's n // 10 + 1 volumes
    LAYOUT = ("<manual_dir>/[MICCAI_FeTS2022_TrainingData/]partitioning_1.csv (Partition_ID,Subject_ID) + "
              "FeTS2022_XXXXX/FeTS2022_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz per patient")
    SOURCE = "the FeTS 2022 challenge (www.synapse.org/#!Synapse:syn28546456) or the FedFMS repository's copy"

    def _data_root(self, root: Path) -> Path:
        for cand in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
            if sorted(cand.glob("partitioning*.csv")):
                return cand
        raise self.missing(f"missing partitioning_1.csv under {root}")

    def discover(self, root: Path) -> dict[str, list[Case]]:
        modality = self.option("modality")
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}")
        base = self._data_root(root)
        csvs = sorted(base.glob("partitioning*.csv"))
        part_csv = base / "partitioning_1.csv" if (base / "partitioning_1.csv").is_file() else csvs[0]
        partitions = read_partitioning(part_csv)
        out = {}
        for site in self.sites_to_build():
            subjects = partitions.get(site)
            if not subjects:
                raise self.missing(f"partition {site} not in {part_csv}")
            cases = []
            for subject in subjects:
                folder = base / subject
                if not folder.is_dir():
                    raise self.missing(f"missing patient folder {folder} listed in {part_csv.name}")
                image_path, seg_path = _find(folder, subject, modality), _find(folder, subject, "seg")
                cases.append(Case(subject, self._loader(image_path, seg_path)))
            out[site] = cases
        return out

    @staticmethod
    def _loader(image_path: Path, seg_path: Path):
        def load():
            vol = preprocess.axial_slices(preprocess.clip_scale(preprocess.read_nifti(image_path)))
            seg = preprocess.axial_slices(preprocess.read_nifti(seg_path))
            if vol.shape != seg.shape:
                raise DataError(f"fets: {seg_path} has shape {seg.shape}, its image {vol.shape}")
            core = (seg == 1) | (seg == 4)
            for z in range(1, vol.shape[0] - 1):
                # The original keeps slices with tumour plus every fifth empty slice.
                if not core[z].any() and z % 5:
                    continue
                image = np.stack([vol[z - 1], vol[z], vol[z + 1]], axis=-1)  # neighbours as channels
                yield f"{z:03d}", image, core[z][..., None]
        return load
