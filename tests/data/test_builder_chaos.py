import shutil

import numpy as np
import pytest

from fedfms_jax.data import DataError, get_federation
from tests.data import fake_raw
from tests.data.checks import check_federation, upsampled

LIVER_SLICES = (1, 2, 3)  # of 5; slices 0 and 4 have no liver
ORGAN_VALUES = {"liver": 63, "right_kidney": 126, "left_kidney": 189, "spleen": 252}


def _series(rng, folder, ground_values, ct):
    for z in range(5):
        img = rng.normal(900 if ct else 300, 50, size=(40, 36)).clip(0).astype(np.uint16)
        g = np.zeros((40, 36), np.uint8)
        if z in LIVER_SLICES:
            g[5:20, 5:20] = ground_values["liver"]
            img[5:20, 5:20] += 600
        if not ct:  # the other organs of the MR masks
            g[25:35, 25:32] = ground_values["spleen"]
            g[25:35, 5:12] = ground_values["right_kidney"]
            img[25:35, 25:32] += 300
        fake_raw.image(folder / "images" / f"IMG-0001-{z + 1:05d}.png", img)
        fake_raw.image(folder / "Ground" / f"liver_GT_{z:03d}.png" if ct else folder / "Ground" / f"IMG-0001-{z + 1:05d}.png", g)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos_raw")
    base = root / "CHAOS_Train_Sets" / "Train_Sets"
    rng = np.random.default_rng(0)
    for p in (1, 2, 5):
        _series(rng, base / "CT" / str(p), {"liver": 255}, ct=True)
    for p in (1, 2, 3, 8):
        _series(rng, base / "MR" / str(p) / "T2SPIR", ORGAN_VALUES, ct=False)
        # T1DUAL: InPhase/OutPhase slices share one Ground folder; only slice 1 has liver here
        t1 = base / "MR" / str(p) / "T1DUAL"
        for z in range(5):
            for phase in ("InPhase", "OutPhase"):
                fake_raw.image(t1 / "images" / phase / f"IMG-0002-{z + 1:05d}.png", np.full((40, 36), 100, np.uint16))
            g = np.zeros((40, 36), np.uint8)
            g[5:9, 5:9] = ORGAN_VALUES["liver"] if z == 1 else 0
            fake_raw.image(t1 / "Ground" / f"IMG-0002-{z + 1:05d}.png", g)
    return root


def test_chaos_builder(raw, tmp_path):
    fed = get_federation("chaos", image_size=32, data_dir=tmp_path, manual_dir=raw)
    data = check_federation(fed, ["CT", "MR"], 1, 32)
    for site, patients in (("CT", 3), ("MR", 4)):
        train, val = data[site]
        # slices without the organ are dropped (no choice published for CHAOS)
        assert len(train) + len(val) == patients * len(LIVER_SLICES)
        assert len(val) == len(LIVER_SLICES)
        for ex in train + val:
            fg = upsampled(ex["mask"][..., 0], 4).astype(bool)
            # only the liver: its square is 15x15 of 40x36 pixels; spleen and kidney are not foreground
            assert 0.1 < fg.mean() < 0.2
            assert ex["image"][..., 0][fg].mean() > ex["image"][..., 0][~fg].mean() + 60


def test_chaos_t1dual(raw, tmp_path):
    fed = get_federation("chaos", image_size=32, data_dir=tmp_path, manual_dir=raw, mr_sequence="T1DUAL/InPhase")
    assert len(fed.all("MR")) == 4  # one liver slice per patient
    with pytest.raises(ValueError, match="mr_sequence"):
        get_federation("chaos", image_size=32, data_dir=tmp_path, manual_dir=raw, mr_sequence="T1")


def test_chaos_errors(raw, tmp_path):
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    series = broken / "CHAOS_Train_Sets" / "Train_Sets" / "MR" / "3" / "T2SPIR"
    (series / "Ground" / "IMG-0001-00002.png").unlink()
    with pytest.raises(DataError, match=r"MR/3/T2SPIR: 5 image slices but 4 Ground masks"):
        get_federation("chaos", image_size=32, data_dir=tmp_path / "a", manual_dir=broken)
    shutil.rmtree(series / "images")
    (series / "Ground" / "IMG-0001-00002.png").write_bytes(b"")
    (series / "DICOM_anon").mkdir()
    for z in range(5):
        (series / "DICOM_anon" / f"IMG-0001-{z + 1:05d}.dcm").write_bytes(b"not dicom")
    with pytest.raises(DataError, match=r"DICOM_anon/IMG-0001-00001.dcm"):
        get_federation("chaos", image_size=32, data_dir=tmp_path / "b", manual_dir=broken)
