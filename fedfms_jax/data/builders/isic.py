"""ISIC 2018 skin-lesion federation: Task 1 dermoscopy images, clients = source collections."""
from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np

from fedfms_jax.data import preprocess
from fedfms_jax.data.builders.base import Case, FederationBuilder
from fedfms_jax.data.errors import DataError
from fedfms_jax.data.registry import FEDERATIONS

ID_COLUMNS = ("isic_id", "image_id", "image", "name", "image_name")
SOURCE_COLUMNS = ("collection", "source", "attribution", "dataset", "site")


def read_sources(path: Path) -> dict[str, str]:
    """Metadata CSV -> image id -> source collection ('MSK-3' and 'MSK-1' both become 'MSK')."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    cols = {c.lower(): c for c in (rows[0] if rows else {})}
    id_col = next((cols[c] for c in ID_COLUMNS if c in cols), None)
    src_col = next((cols[c] for c in SOURCE_COLUMNS if c in cols), None)
    if not id_col or not src_col:
        raise DataError(f"{path} needs an image id column ({'/'.join(ID_COLUMNS)}) and a source column "
                        f"({'/'.join(SOURCE_COLUMNS)})")
    return {r[id_col].strip(): re.sub(r"[-_ ]+\d+$", "", r[src_col].strip()) or r[src_col].strip()
            for r in rows if r[id_col].strip()}


class FedfmsIsic(FederationBuilder):
    """Dermoscopy lesion segmentation; one class; three clients by image source collection."""

    NUM_CLASSES = FEDERATIONS["isic"].num_classes
    NUM_CLIENTS = 3
    OPTIONS = {"collections": ""}  # "A,B,C" fixes the clients; empty: the 3 largest collections
    LAYOUT = ("<manual_dir>/ISIC2018_Task1-2_Training_Input/ISIC_XXXXXXX.jpg + "
              "ISIC2018_Task1_Training_GroundTruth/ISIC_XXXXXXX_segmentation.png (Validation/Test pairs too) + "
              "a metadata .csv with isic_id and collection/attribution columns (ISIC archive export)")
    SOURCE = "the ISIC 2018 challenge, challenge.isic-archive.com/data/#2018 (metadata: api.isic-archive.com)"

    def discover(self, root: Path) -> dict[str, list[Case]]:
        pairs = []
        for inp in sorted(root.glob("ISIC2018_Task1*_Input")):
            gt = root / inp.name.replace("Task1-2", "Task1").replace("_Input", "_GroundTruth")
            for img in preprocess.list_images(inp):
                pairs.append((img, preprocess.find_by_stem(gt, f"{img.stem}_segmentation")))
        if not pairs:
            raise self.missing(f"missing {root / 'ISIC2018_Task1-2_Training_Input'}")
        csvs = sorted(root.glob("*.csv"))
        if not csvs:
            raise self.missing(f"missing metadata .csv in {root}")
        sources: dict[str, str] = {}
        for path in csvs:
            sources.update(read_sources(path))
        unknown = [img.stem for img, _ in pairs if img.stem not in sources]
        if unknown:
            raise self.missing(f"{len(unknown)} images have no source in {', '.join(p.name for p in csvs)} "
                               f"(first: {unknown[0]})")
        chosen = [c for c in str(self.option("collections")).split(",") if c]
        if not chosen:  # the largest collections, ties by name
            counts = Counter(sources[img.stem] for img, _ in pairs)
            chosen = sorted(counts, key=lambda c: (-counts[c], c))[: self.NUM_CLIENTS]
        out: dict[str, list[Case]] = {c: [] for c in chosen}
        for img, gt in pairs:
            src = sources[img.stem]
            if src in out:
                out[src].append(Case(img.stem, self._loader(img, gt)))
        return out

    @staticmethod
    def _loader(img: Path, gt: Path):
        def load():
            mask = preprocess.read_image(gt)
            mask = mask[..., 0] if mask.ndim == 3 else mask
            yield "", preprocess.read_image(img), (np.asarray(mask) > 127 if mask.max(initial=0) > 1 else mask > 0)[..., None]
        return load
