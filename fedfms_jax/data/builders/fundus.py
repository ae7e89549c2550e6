"""Fundus federation: optic disc and optic cup (2 classes) from four public releases."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfms_jax.data import preprocess
from fedfms_jax.data.builders.base import Case, FederationBuilder
from fedfms_jax.data.errors import DataError
from fedfms_jax.data.registry import FEDERATIONS

_SOFT_OD, _SOFT_CUP = "_ODsegSoftmap", "_cupsegSoftmap"


def _index(folder: Path) -> dict[str, Path]:
    """Image files under `folder` (recursive) by stem."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in preprocess.IMAGE_SUFFIXES}


def disc_cup(label: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(disc incl. cup, cup) from a label map: index coding (0 bg, 1 disc rim, 2 cup) as in
    the original's preprocessed data, or the REFUGE grey coding (255 bg, 128 rim, 0 cup)."""
    if label.ndim == 3:
        label = label[..., 0]
    values = np.unique(label)
    if values.max(initial=0) <= 2:
        return label >= 1, label == 2
    if values.max() > 255:
        raise DataError(f"cannot read disc/cup coding of {path}: values {values[:8].tolist()}")
    return label < 192, label < 64


class FedfmsFundus(FederationBuilder):
    """Retinal fundus photographs; mask channels (optic disc, optic cup)."""

    SITES = FEDERATIONS["fundus"].sites
    NUM_CLASSES = FEDERATIONS["fundus"].num_classes
    OPTIONS = {"disc_excludes_cup": False}  # True: the original's disc channel is the rim only
    LAYOUT = ("<manual_dir>/{REFUGE,ORIGA,G1020,Drishti-GS1}/images/<name>.jpg|png|bmp|tif (subfolders allowed) "
              "+ <site>/labels/<name>.png|bmp (0 bg, 1 disc, 2 cup; or REFUGE grey 255 bg, 128 disc, 0 cup; "
              "Drishti-GS1: <name>_ODsegSoftmap.png + <name>_cupsegSoftmap.png)")
    SOURCE = ("REFUGE (refuge.grand-challenge.org), ORIGA and G1020 (their public releases), "
              "Drishti-GS1 (cvit.iiit.ac.in/projects/mip/drishti-gs); the FedFMS repository links a packed copy")

    def discover(self, root: Path) -> dict[str, list[Case]]:
        out = {}
        rim_only = bool(self.option("disc_excludes_cup"))
        for site in self.sites_to_build():
            folder = root / site
            if not folder.is_dir():
                raise self.missing(f"missing site folder {folder}")
            images = _index(folder / "images")
            if not images:
                raise self.missing(f"no images in {folder / 'images'}")
            labels = _index(folder / "labels") or _index(folder / "masks")
            cases = []
            for stem, img_path in images.items():
                if stem in labels:
                    lab = (labels[stem],)
                elif stem + _SOFT_OD in labels and stem + _SOFT_CUP in labels:
                    lab = (labels[stem + _SOFT_OD], labels[stem + _SOFT_CUP])
                else:
                    raise self.missing(f"missing mask {folder / 'labels' / stem}.png for image {img_path}")

                def load(img_path=img_path, lab=lab):
                    image = preprocess.read_image(img_path)
                    if len(lab) == 1:
                        disc, cup = disc_cup(preprocess.read_image(lab[0]), lab[0])
                    else:  # Drishti soft maps: the original keeps values >= 100 of 255
                        od, oc = (preprocess.read_image(p) for p in lab)
                        disc, cup = (np.asarray(a)[..., 0] if np.ndim(a) == 3 else np.asarray(a) for a in (od, oc))
                        disc, cup = disc >= 100, cup >= 100
                        disc = disc | cup
                    if rim_only:
                        disc = disc & ~cup
                    yield "", image, np.stack([disc, cup], axis=-1)

                cases.append(Case(stem, load))
            out[site] = cases
        return out
