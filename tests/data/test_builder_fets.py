import numpy as np
import pytest

from fedfms_jax.data import DataError, get_federation
from tests.data import fake_raw
from tests.data.checks import check_federation, upsampled

PARTITIONS = {"1": 3, "6": 2, "18": 2, "21": 3, "2": 1}  # partition 2 is not one of the four sites
DEPTH = 12
CORE = {3: 1, 4: 4, 6: 4}  # slice -> label: necrotic core (1) or enhancing tumour (4)
EDEMA_ONLY = (7, 8)  # label 2 only: not tumour core


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("fets_raw")
    base = root / "MICCAI_FeTS2022_TrainingData"
    rng = np.random.default_rng(0)
    rows, n = ["Partition_ID,Subject_ID"], 0
    for part, count in PARTITIONS.items():
        for _ in range(count):
            subject = f"FeTS2022_{n:05d}"
            n += 1
            rows.append(f"{part},{subject}")
            seg = np.zeros((20, 16, DEPTH), np.int16)
            for z, v in CORE.items():
                seg[4:10, 5:11, z] = v
            for z in EDEMA_ONLY:
                seg[4:10, 5:11, z] = 2
            for mod in ("flair", "t1", "t1ce", "t2"):
                vol = rng.normal(100, 10, size=seg.shape).astype(np.float32)
                vol += np.arange(DEPTH, dtype=np.float32) * 20  # slices differ: neighbours are distinguishable
                vol[seg > 0] += 300 if mod == "t1ce" else 50
                fake_raw.nifti(base / subject / f"{subject}_{mod}.nii.gz", vol)
            fake_raw.nifti(base / subject / f"{subject}_seg.nii.gz", seg)
    (base / "partitioning_1.csv").write_text("\n".join(rows) + "\n")
    return root


def test_fets_builder(raw, tmp_path):
    fed = get_federation("fets", image_size=32, data_dir=tmp_path, manual_dir=raw)
    data = check_federation(fed, ["1", "6", "18", "21"], 1, 32)
    # kept slices: 1..DEPTH-2 with tumour core, plus every fifth empty one (the original's rule)
    kept = sorted(set(CORE) | {z for z in range(1, DEPTH - 1) if z % 5 == 0})
    for site, count in [("1", 3), ("6", 2), ("18", 2), ("21", 3)]:
        train, val = data[site]
        assert len(train) + len(val) == count * len(kept)
        assert len(val) == len(kept)  # one whole patient
        zs = sorted(int(e["case_id"].split("/")[1]) for e in train + val)
        assert zs == sorted(kept * count)
        for ex in train + val:
            z = int(ex["case_id"].split("/")[1])
            assert bool(ex["mask"].any()) == (z in CORE)  # edema (label 2) is background
            # channels are the neighbouring slices (intensity rises with depth)
            means = ex["image"][26:, 22:].reshape(-1, 3).mean(0)  # a corner without tumour
            assert means[0] < means[1] < means[2]
            if z in CORE:
                fg = upsampled(ex["mask"][..., 0], 4).astype(bool)
                assert ex["image"][..., 1][fg].mean() > ex["image"][..., 1][~fg].mean() + 40


def test_fets_missing(raw, tmp_path):
    import shutil
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    (broken / "MICCAI_FeTS2022_TrainingData" / "FeTS2022_00004" / "FeTS2022_00004_t1ce.nii.gz").unlink()
    with pytest.raises(DataError, match=r"FeTS2022_00004_t1ce.nii.gz"):
        get_federation("fets", image_size=32, data_dir=tmp_path / "a", manual_dir=broken)
    (broken / "MICCAI_FeTS2022_TrainingData" / "partitioning_1.csv").unlink()
    with pytest.raises(DataError, match=r"partitioning_1.csv.*synapse"):
        get_federation("fets", image_size=32, data_dir=tmp_path / "b", manual_dir=broken)
