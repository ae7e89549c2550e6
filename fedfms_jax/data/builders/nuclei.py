"""Nuclei federation: 7 histology sites (PanNuke tissue types, MoNuSAC 2020, TNBC, MoNuSeg 2018)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfms_jax.data import preprocess
from fedfms_jax.data.builders.base import Case, FederationBuilder
from fedfms_jax.data.errors import DataError
from fedfms_jax.data.registry import FEDERATIONS

# site -> (PanNuke fold, tissue type)
PANNUKE_SITES = {
    "PanNuke2Adrenal_gland": (2, "Adrenal_gland"),
    "PanNuke2Esophagus": (2, "Esophagus"),
    "PanNuke3Bile-duct": (3, "Bile-duct"),
    "PanNuke3Uterus": (3, "Uterus"),
}


def image_label_pairs(folder: Path, builder) -> list[tuple[Path, Path]]:
    """<folder>/images/<stem>.* with <folder>/labels/<stem>.* (or masks/)."""
    images = preprocess.list_images(folder / "images")
    label_dir = folder / "labels" if (folder / "labels").is_dir() else folder / "masks"
    if not images:
        raise builder.missing(f"no images in {folder / 'images'}")
    return [(p, preprocess.find_by_stem(label_dir, p.stem)) for p in images]


def tnbc_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """TNBC release: Slide_XX/<n>.png with GT_XX/<n>.png; the slide is the patient."""
    out = []
    for slide in sorted(folder.glob("Slide_*")):
        gt = folder / slide.name.replace("Slide_", "GT_")
        for img in preprocess.list_images(slide):
            out.append((slide.name, img, preprocess.find_by_stem(gt, img.stem)))
    return out


def _pannuke_files(root: Path, fold: int) -> dict[str, Path]:
    for base in (root / f"PanNuke{fold}", root / f"Fold {fold}", root / f"fold{fold}", root / f"Fold{fold}"):
        if base.is_dir():
            found = {name: next(iter(sorted(base.rglob(f"{name}.npy"))), None)
                     for name in ("images", "types", "masks")}
            missing = [n for n, p in found.items() if p is None]
            if missing:
                raise DataError(f"nuclei: missing {', '.join(m + '.npy' for m in missing)} under {base} "
                                "(PanNuke fold layout: images/fold{k}/images.npy, types.npy, masks/fold{k}/masks.npy)")
            return found
    return {}


def _binary(label: np.ndarray) -> np.ndarray:
    """Instance or binary label image -> nuclei foreground."""
    label = np.asarray(label)
    if label.ndim == 3:
        label = label[..., :3].max(axis=-1)
    return label > 0


def _file_cases(pairs, case_of) -> list[Case]:
    by_case: dict[str, list] = {}
    for img, lab in pairs:
        by_case.setdefault(case_of(img), []).append((img, lab))

    def loader(items):
        def load():
            for img, lab in items:
                yield img.stem, preprocess.read_image(img), _binary(preprocess.read_image(lab))[..., None]
        return load

    return [Case(case, loader(items), images=tuple(Case(case, loader([item])) for item in items) if len(items) > 1
                 else ()) for case, items in by_case.items()]


class FedfmsNuclei(FederationBuilder):
    """H&E nuclei segmentation; one binary class (any nucleus)."""

    SITES = FEDERATIONS["nuclei"].sites
    NUM_CLASSES = FEDERATIONS["nuclei"].num_classes
    LAYOUT = ("<manual_dir>/PanNuke2/ and PanNuke3/ (PanNuke folds 2 and 3 as released: images.npy, types.npy, "
              "masks.npy) or <site>/images + <site>/labels; <manual_dir>/TNBC/Slide_XX + GT_XX (release) or "
              "TNBC/images + labels; <manual_dir>/{MoNuSAC2020,MoNuSAC2018}/images/<name>.png|tif + labels/<name>.png|tif "
              "(instance or binary masks; XML annotations must be rasterised first)")
    SOURCE = ("PanNuke (warwick.ac.uk/fac/cross_fac/tia/data/pannuke), MoNuSAC 2020 (monusac-2020.grand-challenge.org), "
              "MoNuSeg 2018 (monuseg.grand-challenge.org), TNBC (zenodo.org/record/1175282); "
              "the FedFMS repository links a packed copy")

    def discover(self, root: Path) -> dict[str, list[Case]]:
        out = {}
        folds: dict[int, dict] = {}
        for site in self.sites_to_build():
            folder = root / site
            if site in PANNUKE_SITES and not (folder / "images").is_dir():
                fold, tissue = PANNUKE_SITES[site]
                if fold not in folds:
                    folds[fold] = _pannuke_files(root, fold)
                if not folds[fold]:
                    raise self.missing(f"missing PanNuke fold {fold} folder {root / f'PanNuke{fold}'} (or {folder})")
                out[site] = self._pannuke_cases(folds[fold], tissue)
            elif site == "TNBC" and folder.is_dir() and any(folder.glob("Slide_*")):
                triples = tnbc_pairs(folder)
                slide = {img: s for s, img, _ in triples}
                out[site] = _file_cases([(i, l) for _, i, l in triples], lambda p: slide[p])
            elif folder.is_dir():
                out[site] = _file_cases(image_label_pairs(folder, self), lambda p: preprocess.patient_of(p.stem)
                                        if p.stem.upper().startswith("TCGA-") else p.stem)
            else:
                raise self.missing(f"missing site folder {folder}")
        return out

    def _pannuke_cases(self, files: dict[str, Path], tissue: str) -> list[Case]:
        types = preprocess.read_npy(files["types"], mmap=False)
        rows = np.nonzero(np.asarray(types).astype(str) == tissue)[0]
        if not len(rows):
            raise self.missing(f"no {tissue} images in {files['types']}")

        def loader(i):
            def load():
                images = preprocess.read_npy(files["images"])
                masks = preprocess.read_npy(files["masks"])
                if images.shape[0] != types.shape[0] or masks.shape[0] != types.shape[0]:
                    raise DataError(f"nuclei: {files['images']}, {files['masks']} and {files['types']} "
                                    "disagree in length")
                image = np.clip(np.asarray(images[i], np.float32), 0, 255).astype(np.uint8)
                # channels 0-4 are nucleus types (instance ids), the last one is background
                fg = np.asarray(masks[i])[..., :-1].sum(axis=-1) != 0
                yield "", image, fg[..., None]
            return load

        return [Case(f"{tissue}{int(i)}", loader(int(i))) for i in rows]
