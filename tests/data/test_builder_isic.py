import shutil

import numpy as np
import pytest

from fedfms_jax.data import DataError, get_federation
from tests.data import fake_raw
from tests.data.checks import check_federation, upsampled

# collection -> number of images; MSK-1/MSK-2 and UDA-1/UDA-2 are one source each
COLLECTIONS = {"MSK-1": 3, "MSK-2": 3, "HAM10000": 5, "UDA-1": 2, "UDA-2": 2, "SONIC": 1}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("isic_raw")
    rng = np.random.default_rng(0)
    rows, n = ["isic_id,attribution,diagnosis"], 0
    for coll, count in COLLECTIONS.items():
        for _ in range(count):
            stem = f"ISIC_{n:07d}"
            n += 1
            img, lesion = fake_raw.blob_image(rng, 36, 44)
            fake_raw.image(root / "ISIC2018_Task1-2_Training_Input" / f"{stem}.jpg", img, quality=95)
            fake_raw.image(root / "ISIC2018_Task1_Training_GroundTruth" / f"{stem}_segmentation.png",
                           (lesion * 255).astype(np.uint8))
            rows.append(f"{stem},{coll},nevus")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_isic_builder(raw, tmp_path):
    fed = get_federation("isic", image_size=64, data_dir=tmp_path, manual_dir=raw)
    data = check_federation(fed, ["MSK", "HAM10000", "UDA"], 1, 64)  # three largest, by size
    assert {s: len(tr) + len(va) for s, (tr, va) in data.items()} == {"MSK": 6, "HAM10000": 5, "UDA": 4}
    for train, val in data.values():
        assert len(val) == 1
        for ex in train + val:
            fg = upsampled(ex["mask"][..., 0]).astype(bool)
            assert fg.any() and ex["image"][fg].mean() > ex["image"][~fg].mean() + 100
    fixed = get_federation("isic", image_size=64, data_dir=tmp_path, manual_dir=raw, collections="UDA,SONIC,MSK")
    assert fixed.sites == ["UDA", "SONIC", "MSK"] and len(fixed.all("SONIC")) == 1


def test_isic_missing(raw, tmp_path):
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    (broken / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000004_segmentation.png").unlink()
    with pytest.raises(DataError, match=r"ISIC_0000004_segmentation"):
        get_federation("isic", image_size=64, data_dir=tmp_path / "a", manual_dir=broken)
    shutil.rmtree(broken / "ISIC2018_Task1_Training_GroundTruth")
    (broken / "metadata.csv").unlink()
    shutil.rmtree(broken / "ISIC2018_Task1-2_Training_Input")
    (broken / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"ISIC2018_Task1-2_Training_Input.*isic-archive"):
        get_federation("isic", image_size=64, data_dir=tmp_path / "b", manual_dir=broken)
