"""TFDS builders of the FedFMS federations and `load_federation`, which prepares and opens one."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from fedfms_jax.data.errors import DataError
from fedfms_jax.data.indexing import normalize_index
from fedfms_jax.data.preprocess import sanitize
from fedfms_jax.data.registry import federation_info
from fedfms_jax.data.sources import Federation


def builder_class(name: str):
    """The TFDS builder class of federation `name` (see registry.FEDERATIONS)."""
    module, cls = federation_info(name).builder.split(":")
    return getattr(importlib.import_module(f"fedfms_jax.data.builders.{module}"), cls)


class DecodedSource:
    """A TFDS data source whose examples carry case_id as str instead of bytes."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    @staticmethod
    def _decode(ex: dict) -> dict:
        cid = ex.get("case_id")
        if isinstance(cid, (bytes, np.bytes_)):
            ex = dict(ex, case_id=cid.decode())
        return ex

    def __getitem__(self, i: int) -> dict:
        i = normalize_index(i, len(self))
        return self._decode(self.source[i])

    def __getitems__(self, indices):
        return [self._decode(ex) for ex in self.source.__getitems__(list(indices))]


class EmptySource:
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> dict:
        raise IndexError(i)


def default_data_dir() -> str:
    return os.environ.get("FEDFMS_DATA_DIR") or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets")


def make_builder(name: str, *, image_size: int, data_dir=None, **kw):
    """The builder of federation `name`. Options left at their default are dropped, so a
    builder config's name (and its prepared data) only changes with a non-default option.
    `sites=(...)` builds only those sites (a hospital's own data), under a config of its own."""
    from fedfms_jax.data.builders.base import make_config
    cls = builder_class(name)
    known = dict(cls.BASE_OPTIONS, **cls.OPTIONS)
    unknown = set(kw) - {"val_fraction", "split_seed", "sites"} - set(known)
    if unknown:
        raise TypeError(f"{name} takes no option(s) {sorted(unknown)}; options: "
                        f"val_fraction, split_seed, sites{''.join(', ' + k for k in known)}")
    strangers = [s for s in kw.get("sites", ()) if cls.SITES and s not in cls.SITES]
    if strangers:
        raise ValueError(f"{name} has no site(s) {', '.join(strangers)}; sites: {', '.join(cls.SITES)}")
    kw = {k: v for k, v in kw.items() if k not in known or v != known[k]}
    config = make_config(image_size, **kw)
    predefined = {c.name for c in cls.BUILDER_CONFIGS}
    return cls(config=config.name if config.name in predefined else config,
               data_dir=str(data_dir or default_data_dir()), file_format="array_record")


def load_federation(name: str, *, image_size: int, data_dir=None, manual_dir=None, **kw):
    """Prepare (first call) and open federation `name`; returns a sources.Federation."""
    import tensorflow_datasets as tfds  # heavy: only when a TFDS federation is opened

    builder = make_builder(name, image_size=image_size, data_dir=data_dir, **kw)
    if not builder.is_prepared():
        if manual_dir is None and getattr(builder, "NEEDS_MANUAL", True):
            raise builder.missing("no manual_dir given and the dataset is not prepared yet")
        if manual_dir is not None and not Path(manual_dir).expanduser().is_dir():
            raise builder.missing(f"manual_dir {manual_dir} does not exist")
        dl_config = tfds.download.DownloadConfig(
            manual_dir=str(Path(manual_dir).expanduser()) if manual_dir is not None else None)
        try:
            builder.download_and_prepare(download_config=dl_config)
        except DataError as e:  # TFDS prefixes context lines; keep the one-line message
            raise DataError(e.message) from None
    sources = builder.as_data_source()
    sites = list(builder.info.metadata.get("sites") or builder.SITES)
    splits = {}
    for site in sites:
        splits[site] = {part: DecodedSource(sources[key]) if key in sources else EmptySource()
                        for part in ("train", "val") for key in [f"{sanitize(site)}_{part}"]}
    return Federation(name, sites, builder.NUM_CLASSES, image_size, splits,
                      unseen=getattr(importlib.import_module(type(builder).__module__), "UNSEEN", None))
