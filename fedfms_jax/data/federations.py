"""Registry of federations: one call returns every site's train/val sources.

    fed = get_federation("prostate", image_size=1024, manual_dir="~/data/prostate")
    fed.sites            # ["BIDMC", "HK", ...] in the original's client order
    fed.train("HK")[0]   # {"image": uint8 [S,S,3], "mask": uint8 [S/4,S/4,C], "case_id": str}

Real federations are TFDS builders (array_record) prepared on first use from the user's
manual download; "nuclei_demo" is prepared from files fetched from package wheels;
"synthetic" is generated in memory.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from fedfms_jax.data import synthetic
from fedfms_jax.data.errors import DataError
from fedfms_jax.data.indexing import normalize_index


class Source(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict: ...


class ConcatSource:
    """Random access over several sources one after another (used for `Federation.all`)."""

    def __init__(self, parts: Sequence[Source]):
        self.parts = list(parts)
        self._ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> dict:
        i = normalize_index(i, len(self))
        part = int(np.searchsorted(self._ends, i, side="right"))
        start = 0 if part == 0 else int(self._ends[part - 1])
        return self.parts[part][i - start]


@dataclasses.dataclass
class Federation:
    name: str
    sites: list[str]
    num_classes: int
    image_size: int
    splits: dict[str, dict[str, Source]]  # site -> {"train": source, "val": source}
    unseen: str | None = None  # the site a demo holds out by default (leave-one-site-out picks any)

    def _site(self, site: str | int) -> dict[str, Source]:
        if isinstance(site, int):
            site = self.sites[site]
        if site not in self.splits:
            raise KeyError(f"{self.name} has no site {site!r}; sites: {self.sites}")
        return self.splits[site]

    def train(self, site: str | int) -> Source:
        return self._site(site)["train"]

    def val(self, site: str | int) -> Source:
        return self._site(site)["val"]

    def all(self, site: str | int) -> Source:
        """Every example of a site (train then val): what an unseen site is tested on."""
        s = self._site(site)
        return ConcatSource([s["train"], s["val"]])

    @property
    def mask_size(self) -> int:
        return self.image_size // 4


def _synthetic(*, image_size: int, data_dir=None, manual_dir=None, num_sites: int = 4,
               images_per_site: int | list[int] = 16, num_classes: int = 1, seed: int = 0,
               val_fraction: float = 0.25) -> Federation:
    del data_dir, manual_dir
    sizes = synthetic.site_sizes(num_sites, images_per_site)
    sites = [f"site{i}" for i in range(num_sites)]
    splits = {}
    for i, (name, n) in enumerate(zip(sites, sizes)):
        n_val = int(round(n * val_fraction)) if n > 1 else 0
        mk = lambda idx: synthetic.SyntheticSource(  # noqa: E731
            seed=seed, site=i, indices=idx, image_size=image_size, num_classes=num_classes)
        splits[name] = {"train": mk(range(n - n_val)), "val": mk(range(n - n_val, n))}
    return Federation("synthetic", sites, num_classes, image_size, splits)


def _tfds(builder_name: str) -> Callable[..., Federation]:
    def load(*, image_size: int, data_dir=None, manual_dir=None, **kw: Any) -> Federation:
        from fedfms_jax.data.builders import load_federation
        return load_federation(builder_name, image_size=image_size, data_dir=data_dir,
                               manual_dir=manual_dir, **kw)
    return load


FEDERATIONS: dict[str, Callable[..., Federation]] = {
    "prostate": _tfds("prostate"),
    "fundus": _tfds("fundus"),
    "nuclei": _tfds("nuclei"),
    "fets": _tfds("fets"),
    "ctlung": _tfds("ctlung"),
    "isic": _tfds("isic"),
    "chaos": _tfds("chaos"),
    "nuclei_demo": _tfds("nuclei_demo"),
    "synthetic": _synthetic,
}


def get_federation(name: str, *, image_size: int, data_dir=None, manual_dir=None, **kw) -> Federation:
    """Sources of every site of federation `name` at `image_size` (masks at image_size // 4).

    Raises DataError when a real federation's manual files are missing or unreadable.
    """
    if name not in FEDERATIONS:
        raise KeyError(f"unknown federation {name!r}; known: {sorted(FEDERATIONS)}")
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
    return FEDERATIONS[name](image_size=image_size, data_dir=data_dir, manual_dir=manual_dir, **kw)


__all__ = ["Federation", "ConcatSource", "get_federation", "FEDERATIONS", "DataError"]
