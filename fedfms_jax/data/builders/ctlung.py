"""CT lung federation: 5 sites of CT slices with lung masks (the original's CTLung layout)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfms_jax.data import preprocess
from fedfms_jax.data.builders.base import Case, FederationBuilder
from fedfms_jax.data.registry import FEDERATIONS


def lung_mask(label: np.ndarray) -> np.ndarray:
    """The original reads colour masks' third channel (>= 150); grey masks are 0/1 or 0/255."""
    label = np.asarray(label)
    if label.ndim == 3:
        return label[..., 2] >= 150 if label.shape[-1] >= 3 else label[..., 0] > 0
    return label > 0 if label.max(initial=0) <= 1 else label >= 128


class FedfmsCtlung(FederationBuilder):
    """Chest CT slices; one binary class (lung)."""

    SITES = FEDERATIONS["ctlung"].sites
    NUM_CLASSES = FEDERATIONS["ctlung"].num_classes
    LAYOUT = ("<manual_dir>/{1,2,3,4,5}/images/<name>.png|tif + <site>/masks/<name>.png (RGB masks: lung in "
              "channel 3; or grey 0/255); patient subfolders images/<patient>/<name>.png keep patients together, "
              "else names <patient>_<slice>.png are grouped by <patient>")
    SOURCE = "the FedFMS authors' CT-lung release (5 sites), linked from the FedFMS repository (github.com/LIU-YUXI/FedFMS)"

    def discover(self, root: Path) -> dict[str, list[Case]]:
        out = {}
        for site in self.sites_to_build():
            img_dir, mask_dir = root / site / "images", root / site / "masks"
            if not img_dir.is_dir():
                raise self.missing(f"missing folder {img_dir}")
            files = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in preprocess.IMAGE_SUFFIXES)
            if not files:
                raise self.missing(f"no images in {img_dir}")
            groups: dict[str, list] = {}
            for img in files:
                rel = img.relative_to(img_dir)
                patient = rel.parts[0] if len(rel.parts) > 1 else preprocess.patient_of(img.stem)
                mask = preprocess.find_by_stem(mask_dir / rel.parent, img.stem)
                groups.setdefault(patient, []).append((img, mask))

            def loader(items):
                def load():
                    for img, mask in items:
                        yield img.stem, preprocess.read_image(img), lung_mask(preprocess.read_image(mask))[..., None]
                return load

            out[site] = [Case(p, loader(items), images=tuple(Case(p, loader([item])) for item in items))
                         for p, items in groups.items()]
        return out
