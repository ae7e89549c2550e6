"""Prostate MRI federation: 6 sites of T2 volumes (SAML multi-site prostate release)."""
from __future__ import annotations

from pathlib import Path

from fedfms_jax.data import preprocess
from fedfms_jax.data.builders.base import Case, FederationBuilder
from fedfms_jax.data.errors import DataError
from fedfms_jax.data.registry import FEDERATIONS


def _volume_cases(image_paths: list[Path], label_of, orientation: str) -> list[Case]:
    cases = []
    for img_path in image_paths:
        case_id = img_path.name.split(".nii")[0]

        def load(img_path=img_path, case_id=case_id):
            label_path = label_of(img_path)
            vol = preprocess.read_nifti(img_path)
            lab = preprocess.read_nifti(label_path)
            if vol.shape != lab.shape:
                raise DataError(
                    f"{label_path} has shape {lab.shape}, its image {img_path} {vol.shape}")
            images = preprocess.axial_slices(preprocess.clip_scale(vol), orientation)
            masks = preprocess.axial_slices(lab, orientation) > 0.5  # ISBI's two zones -> one prostate class
            # The original keeps every slice of a volume, with or without prostate.
            for z in range(images.shape[0]):
                yield f"{z:03d}", images[z], masks[z][..., None]

        cases.append(Case(case_id, load))
    return cases


class FedfmsProstate(FederationBuilder):
    """Prostate T2 MRI from six institutions; one binary class (whole prostate)."""

    SITES = FEDERATIONS["prostate"].sites
    NUM_CLASSES = FEDERATIONS["prostate"].num_classes
    # "yx": rows = Y, as viewers show a slice; "xy": nibabel's vol[:, :, z] as the original slices it.
    OPTIONS = {"slice_orientation": "yx"}
    SPLIT_UNIT = "volume"
    LAYOUT = ("<manual_dir>/{BIDMC,HK,I2CVB,ISBI,ISBI_1.5,UCL}/Case00.nii.gz + Case00_segmentation.nii.gz "
              "(SAML release) or <site>/images/Case00.nii.gz + <site>/labels/Case00.nii.gz")
    SOURCE = "the SAML multi-site prostate dataset, https://liuquande.github.io/SAML/"

    def discover(self, root: Path) -> dict[str, list[Case]]:
        orientation = self.option("slice_orientation")
        if orientation not in preprocess.SLICE_ORIENTATIONS:
            raise ValueError(f"slice_orientation must be one of {sorted(preprocess.SLICE_ORIENTATIONS)}")
        out = {}
        for site in self.sites_to_build():
            folder = root / site
            if not folder.is_dir():
                raise self.missing(f"missing site folder {folder}")
            if (folder / "images").is_dir():
                images = sorted((folder / "images").glob("*.nii*"))

                def label_of(p, folder=folder):
                    q = folder / "labels" / p.name
                    if not q.is_file():
                        raise self.missing(f"missing label volume {q}")
                    return q
            else:
                images = sorted(p for p in folder.glob("*.nii*") if "segmentation" not in p.name.lower())

                def label_of(p):
                    stem = p.name.split(".nii")[0]
                    for cand in (f"{stem}_segmentation", f"{stem}_Segmentation"):
                        for ext in (".nii.gz", ".nii"):
                            if (p.parent / (cand + ext)).is_file():
                                return p.parent / (cand + ext)
                    raise self.missing(f"missing segmentation {p.parent / stem}_segmentation.nii.gz")
            if not images:
                raise self.missing(f"no Case*.nii.gz volumes in {folder}")
            for img in images:  # fail before the long conversion, naming the file
                label_of(img)
            out[site] = _volume_cases(images, label_of, orientation)
        return out
