import shutil

import numpy as np
import pytest

from fedfms_jax.data import DataError, get_federation
from tests.data import fake_raw
from tests.data.checks import check_federation, upsampled

SITES = ["1", "2", "3", "4", "5"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctlung_raw")
    rng = np.random.default_rng(0)
    for site in SITES:
        for p in range(3):
            for z in range(3):
                img, lung = fake_raw.blob_image(rng, 40, 40, rgb=False)
                mask = np.zeros((40, 40, 3), np.uint8)
                mask[lung] = (0, 0, 255)  # the original reads the lung from the third channel
                mask[~lung, 0] = 255  # red elsewhere must not count
                if site == "1":  # patient subfolders
                    rel = f"patient{p}/{z:03d}.png"
                else:
                    rel = f"pat{p}_{z:03d}.png"
                fake_raw.image(root / site / "images" / rel, img)
                fake_raw.image(root / site / "masks" / rel, mask)
    return root


def test_ctlung_builder(raw, tmp_path):
    fed = get_federation("ctlung", image_size=64, data_dir=tmp_path, manual_dir=raw)
    data = check_federation(fed, SITES, 1, 64)
    for site, (train, val) in data.items():
        assert len(train) == 6 and len(val) == 3  # one whole patient of three slices
        for ex in train + val:
            fg = upsampled(ex["mask"][..., 0]).astype(bool)
            assert 0.1 < fg.mean() < 0.5
            assert ex["image"][..., 0][fg].mean() > ex["image"][..., 0][~fg].mean() + 100


def test_ctlung_missing_mask(raw, tmp_path):
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    (broken / "3" / "masks" / "pat1_002.png").unlink()
    with pytest.raises(DataError, match=r"3/masks/pat1_002"):
        get_federation("ctlung", image_size=64, data_dir=tmp_path / "a", manual_dir=broken)
