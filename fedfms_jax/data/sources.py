"""Random-access example sources and `Federation`, the sites' sources of one federation."""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

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
