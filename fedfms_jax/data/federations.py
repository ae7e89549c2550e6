"""One call returns every site's train/val sources of a federation.

    fed = get_federation("prostate", image_size=1024, manual_dir="~/data/prostate")
    fed.sites            # ["BIDMC", "HK", ...] in the original's client order
    fed.train("HK")[0]   # {"image": uint8 [S,S,3], "mask": uint8 [S/4,S/4,C], "case_id": str}

Real federations are TFDS builders (array_record) prepared on first use from the user's
manual download; "nuclei_demo" is prepared from files fetched from package wheels;
"synthetic" is generated in memory. Which federations exist is `registry.FEDERATIONS`.
"""
from __future__ import annotations

from fedfms_jax.data import synthetic
from fedfms_jax.data.builders import builder_class, load_federation
from fedfms_jax.data.errors import DataError
from fedfms_jax.data.registry import FEDERATIONS, federation_info
from fedfms_jax.data.sources import ConcatSource, Federation, Source


def synthetic_federation(*, image_size: int, num_sites: int = 4, images_per_site: int | list[int] = 16,
                         num_classes: int = 1, seed: int = 0, val_fraction: float = 0.25) -> Federation:
    sizes = synthetic.site_sizes(num_sites, images_per_site)
    sites = [f"site{i}" for i in range(num_sites)]
    splits = {}
    for i, (name, n) in enumerate(zip(sites, sizes)):
        n_val = int(round(n * val_fraction)) if n > 1 else 0
        mk = lambda idx: synthetic.SyntheticSource(  # noqa: E731
            seed=seed, site=i, indices=idx, image_size=image_size, num_classes=num_classes)
        splits[name] = {"train": mk(range(n - n_val)), "val": mk(range(n - n_val, n))}
    return Federation("synthetic", sites, num_classes, image_size, splits)


def builder_options(name: str, *, fundus_disc: str = "full", val_split: str = "patient",
                    slice_orientation: str = "yx", resize: str = "pil") -> dict:
    """The builder options that a training config's data protocol fields (run_config
    PROTOCOL_DATA_FIELDS) select for federation `name`; none for in-memory federations."""
    if federation_info(name).builder is None:
        return {}
    opts = {"val_split": val_split, "resize": resize}
    own = builder_class(name).OPTIONS
    if "disc_excludes_cup" in own:
        opts["disc_excludes_cup"] = fundus_disc == "rim"  # the rim: disc minus cup
    if "slice_orientation" in own:
        opts["slice_orientation"] = slice_orientation
    return opts


def data_slice_orientation(name: str, slice_orientation: str) -> str:
    """How federation `name`'s prepared slices are laid out under a config's `slice_orientation`
    (what a trained model's model.json records for `predict`): the field where the builder
    takes it (prostate), else "yx" (FeTS is sliced [Y, X] as the original's SimpleITK does)."""
    return builder_options(name, slice_orientation=slice_orientation).get("slice_orientation", "yx")


def get_federation(name: str, *, image_size: int, data_dir=None, manual_dir=None, **kw) -> Federation:
    """Sources of every site of federation `name` at `image_size` (masks at image_size // 4).

    Raises DataError when a real federation's manual files are missing or unreadable.
    """
    info = federation_info(name)
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
    if info.builder is None:
        return synthetic_federation(image_size=image_size, **kw)
    return load_federation(name, image_size=image_size, data_dir=data_dir, manual_dir=manual_dir, **kw)


__all__ = ["Federation", "ConcatSource", "Source", "builder_options", "data_slice_orientation", "get_federation",
           "synthetic_federation", "FEDERATIONS", "DataError"]
