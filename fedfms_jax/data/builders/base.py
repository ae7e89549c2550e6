"""Common TFDS machinery of the federation builders.

A federation builder only says where its files are (`discover`: site -> list of cases,
each case a patient/volume/image that never straddles the train/val split) and how a case
turns into (image, mask) pairs; this base class splits cases per site with a seeded hash,
preprocesses (DESIGN §1) and writes one "<site>_train" / "<site>_val" split per site as
array_record, readable without TensorFlow.

Options every builder takes (`BASE_OPTIONS`): `val_split` "patient" (patient-disjoint) or
"original" (the FedFMS scripts' rule per `SPLIT_UNIT`: images of 2-D data, volumes of
volume data), and `resize` "pil" or "cv2" (preprocess.RESIZES).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds

from fedfms_jax.data import preprocess
from fedfms_jax.data.errors import DataError

_RAW = tfds.features.Encoding.BYTES

# (example id within the case, image [H,W] or [H,W,3], mask [H,W,C] nonzero = foreground)
Slice = tuple[str, np.ndarray, np.ndarray]


@dataclasses.dataclass
class Case:
    case_id: str  # the split unit: patient, volume or image
    load: Callable[[], Iterable[Slice]]
    # A patient of several 2-D images: the same images one per Case (same case_id), for a
    # split by image (val_split="original" of 2-D data). Empty: the case is one unit.
    images: tuple["Case", ...] = ()


@dataclasses.dataclass
class FederationConfig(tfds.core.BuilderConfig):
    image_size: int = 1024
    val_fraction: float = 0.1  # the original moves 10% of each client's data to validation
    split_seed: int = 0
    options: tuple = ()  # builder-specific (key, value) pairs
    sites: tuple = ()  # only these sites (a hospital's own); empty: every site


def make_config(image_size: int, val_fraction: float = 0.1, split_seed: int = 0, sites: tuple = (),
                **options) -> FederationConfig:
    """A builder config; `sites` restricts the build to those sites (each site's split is
    seeded by its own name, so a site reads the same examples built alone or with all)."""
    name = f"s{image_size}"
    if val_fraction != 0.1 or split_seed != 0:
        name += f"_val{int(round(val_fraction * 1000)):03d}_seed{split_seed}"
    for k, v in sorted(options.items()):
        name += f"_{k}-{preprocess.sanitize(str(v))}"
    if sites:
        name += "_only-" + "-".join(preprocess.sanitize(s) for s in sites)
    return FederationConfig(name=name, image_size=image_size, val_fraction=val_fraction,
                            split_seed=split_seed, options=tuple(sorted(options.items())), sites=tuple(sites),
                            description=f"images {image_size}px, masks {image_size // 4}px")


class FederationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of every federation builder (not registered itself)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Images and masks stored as raw bytes.", "1.0.0": "First release."}
    BUILDER_CONFIGS = [make_config(1024), make_config(256)]
    SITES: tuple[str, ...] = ()  # display names in the original's client order
    NUM_CLASSES = 1
    LAYOUT = ""  # one line: the expected manual_dir layout
    SOURCE = ""  # one line: where to get the data
    OPTIONS: dict = {}  # default builder-specific options
    BASE_OPTIONS = {"val_split": "patient", "resize": "pil"}  # every builder's options
    SPLIT_UNIT = "image"  # what val_split="original" splits: "image" (2-D data) or "volume"
    NEEDS_MANUAL = True  # False: the builder fetches its own files (nuclei_demo)

    @classmethod
    def manual_instructions(cls) -> str:
        return f"expected layout: {cls.LAYOUT}; get the data from {cls.SOURCE}"

    @property
    def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # noqa: N802 (TFDS name)
        return self.manual_instructions()

    def option(self, key: str):
        opts = dict(self.BASE_OPTIONS, **self.OPTIONS)
        opts.update(dict(self.builder_config.options))
        return opts[key]

    def sites_to_build(self) -> tuple[str, ...]:
        """The sites `discover` reads: the config's `sites`, else every site."""
        return self.builder_config.sites or self.SITES

    def missing(self, what: str) -> DataError:
        return DataError(f"{self.name}: {what}; {self.manual_instructions()}")

    # -- to implement -----------------------------------------------------------------
    def discover(self, root: Path) -> dict[str, list[Case]]:
        raise NotImplementedError

    # -- TFDS -------------------------------------------------------------------------
    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                # BYTES: stored as one raw buffer; the default packs each pixel as a varint,
                # which costs ~30x more to decode at 1024 px.
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=_RAW),
                "mask": tfds.features.Tensor(shape=(s // 4, s // 4, self.NUM_CLASSES), dtype=np.uint8,
                                             encoding=_RAW),
                "case_id": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _manual_root(self, dl_manager) -> Path:
        try:
            root = Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS: missing or empty manual_dir
            raise self.missing("manual_dir is missing or empty") from None
        return root

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager) if self.NEEDS_MANUAL else None
        cases = self.discover(root)
        if self.builder_config.sites:
            absent = [s for s in self.builder_config.sites if s not in cases]
            if absent:
                raise self.missing(f"no data of site(s) {', '.join(absent)} under {root}")
            cases = {s: c for s, c in cases.items() if s in self.builder_config.sites}
        splits, sizes = {}, {}
        for site, site_cases in cases.items():
            if not site_cases:
                raise self.missing(f"no cases found for site {site} under {root}")
            for part, chosen in zip(("train", "val"), self.split_site(site, site_cases)):
                sizes[f"{site}/{part}"] = len(chosen)
                if chosen:  # TFDS cannot write an empty split; the loader gives an empty source
                    splits[f"{preprocess.sanitize(site)}_{part}"] = self._generate_examples(chosen)
        self.info.metadata["sites"] = list(cases)
        self.info.metadata["cases"] = sizes
        return splits

    def split_site(self, site: str, cases: list[Case]) -> tuple[list[Case], list[Case]]:
        """(train, val) cases of a site under the `val_split` option."""
        cfg = self.builder_config
        rule = self.option("val_split")
        if rule == "patient":
            train_ids, val_ids = preprocess.split_cases(
                [c.case_id for c in cases], cfg.val_fraction, cfg.split_seed, site)
            return [c for c in cases if c.case_id in train_ids], [c for c in cases if c.case_id in val_ids]
        if rule != "original":
            raise ValueError(f"val_split must be one of {preprocess.VAL_SPLITS}, got {rule!r}")
        if self.SPLIT_UNIT == "image":  # the original splits 2-D data by image, patients ignored
            cases = [unit for c in cases for unit in (c.images or (c,))]
        train, val = preprocess.split_original([c.case_id for c in cases], self.SPLIT_UNIT,
                                               cfg.split_seed, site)
        return [cases[i] for i in train], [cases[i] for i in val]

    def _generate_examples(self, cases: list[Case]):
        size = self.builder_config.image_size
        resize = self.option("resize")
        if resize not in preprocess.RESIZES:
            raise ValueError(f"resize must be one of {preprocess.RESIZES}, got {resize!r}")
        for case in cases:
            for slice_id, image, mask in case.load():
                key = f"{case.case_id}/{slice_id}" if slice_id else case.case_id
                if mask.ndim == 2:
                    mask = mask[..., None]
                if mask.shape[-1] != self.NUM_CLASSES:
                    raise DataError(f"{self.name}: {key} has {mask.shape[-1]} mask channels, "
                                    f"expected {self.NUM_CLASSES}")
                if mask.shape[:2] != image.shape[:2]:
                    raise DataError(f"{self.name}: {key}: image {image.shape[:2]} and mask "
                                    f"{mask.shape[:2]} differ in size")
                yield key, preprocess.example(image, mask, size, key, resize)


def require_dir(builder: FederationBuilder, path: Path, what: str) -> Path:
    if not path.is_dir():
        raise builder.missing(f"missing folder {path} ({what})")
    return path
