import shutil

import numpy as np
import pytest
import tifffile

from fedfms_jax.data import DataError, get_federation
from tests.data import fake_raw
from tests.data.checks import check_federation, upsampled

SITES = ["PanNuke2Adrenal_gland", "PanNuke2Esophagus", "PanNuke3Bile-duct", "PanNuke3Uterus",
         "MoNuSAC2020", "TNBC", "MoNuSAC2018"]


def _instances(rng, h, w, n=4):
    lab = np.zeros((h, w), np.uint16)
    for k in range(1, n + 1):
        y, x = rng.integers(4, h - 8), rng.integers(4, w - 8)
        lab[y:y + 5, x:x + 5] = k
    return lab


def _pannuke_fold(rng, types):
    n, s = len(types), 32
    images = rng.uniform(0, 120, size=(n, s, s, 3))
    masks = np.zeros((n, s, s, 6))
    for i in range(n):
        inst = _instances(rng, s, s)
        masks[i, ..., i % 5] = inst  # nucleus type channel holds instance ids
        masks[i, ..., 5] = inst == 0  # the last channel is background
        images[i][inst > 0] = 240.0
    return images, np.asarray(types), masks


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuclei_raw")
    rng = np.random.default_rng(0)
    # fold 2 in the release layout, fold 3 in the original's preprocessed folder names
    im, ty, ma = _pannuke_fold(rng, ["Adrenal_gland"] * 3 + ["Esophagus"] * 4 + ["Colon"] * 2)
    for sub, name, arr in (("images", "images", im), ("images", "types", ty), ("masks", "masks", ma)):
        (root / "Fold 2" / sub / "fold2").mkdir(parents=True, exist_ok=True)
        np.save(root / "Fold 2" / sub / "fold2" / f"{name}.npy", arr)
    im, ty, ma = _pannuke_fold(rng, ["Bile-duct", "Uterus"] * 3)
    for sub, name, arr in (("Images", "images", im), ("Images", "types", ty), ("Masks", "masks", ma)):
        (root / "PanNuke3" / sub).mkdir(parents=True, exist_ok=True)
        np.save(root / "PanNuke3" / sub / f"{name}.npy", arr)
    # MoNuSAC 2020: TCGA-named TIF tiles with instance TIF labels; two tiles per patient
    for p in range(3):
        for t in range(2):
            stem = f"TCGA-A{p}-B{p}C{p}-01Z-00-DX1_{t + 1}"
            lab = _instances(rng, 36, 30)
            img = rng.integers(0, 100, size=(36, 30, 3), dtype=np.uint8)
            img[lab > 0] = 220
            (root / "MoNuSAC2020" / "images").mkdir(parents=True, exist_ok=True)
            (root / "MoNuSAC2020" / "labels").mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / "MoNuSAC2020" / "images" / f"{stem}.tif", img)
            tifffile.imwrite(root / "MoNuSAC2020" / "labels" / f"{stem}.tif", lab)
    # TNBC release: Slide_XX / GT_XX, RGBA PNGs and 0/255 masks
    for slide in (1, 2, 3):
        for t in range(2):
            lab = _instances(rng, 32, 32) > 0
            img = np.concatenate([rng.integers(0, 90, size=(32, 32, 3), dtype=np.uint8),
                                  np.full((32, 32, 1), 255, np.uint8)], -1)
            img[lab, :3] = 210
            fake_raw.image(root / "TNBC" / f"Slide_{slide:02d}" / f"{slide:02d}_{t + 1}.png", img)
            fake_raw.image(root / "TNBC" / f"GT_{slide:02d}" / f"{slide:02d}_{t + 1}.png", (lab * 255).astype(np.uint8))
    # MoNuSeg 2018 rasterised: images/ + masks/ binary PNG
    for i in range(3):
        lab = _instances(rng, 40, 40) > 0
        img = rng.integers(0, 90, size=(40, 40, 3), dtype=np.uint8)
        img[lab] = 230
        fake_raw.image(root / "MoNuSAC2018" / "images" / f"img{i}.png", img)
        fake_raw.image(root / "MoNuSAC2018" / "masks" / f"img{i}.png", (lab * 255).astype(np.uint8))
    return root


def test_nuclei_builder(raw, tmp_path):
    fed = get_federation("nuclei", image_size=64, data_dir=tmp_path, manual_dir=raw)
    data = check_federation(fed, SITES, 1, 64)
    counts = {s: len(tr) + len(va) for s, (tr, va) in data.items()}
    assert counts == {"PanNuke2Adrenal_gland": 3, "PanNuke2Esophagus": 4, "PanNuke3Bile-duct": 3,
                      "PanNuke3Uterus": 3, "MoNuSAC2020": 6, "TNBC": 6, "MoNuSAC2018": 3}
    # MoNuSAC tiles of one patient and TNBC tiles of one slide stay together
    assert len(data["MoNuSAC2020"][1]) == 2 and len(data["TNBC"][1]) == 2
    for site, (train, val) in data.items():
        for ex in train + val:
            fg = upsampled(ex["mask"][..., 0]).astype(bool)
            assert fg.any() and not fg.all(), (site, ex["case_id"])
            # the bright nuclei are the foreground (not PanNuke's background channel)
            assert ex["image"][..., 0][fg].mean() > ex["image"][..., 0][~fg].mean() + 60


def test_nuclei_missing_files(raw, tmp_path):
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    (broken / "PanNuke3" / "Masks" / "masks.npy").unlink()
    with pytest.raises(DataError, match=r"masks.npy under .*PanNuke3"):
        get_federation("nuclei", image_size=64, data_dir=tmp_path / "a", manual_dir=broken)
    shutil.rmtree(broken / "PanNuke3")
    with pytest.raises(DataError, match=r"PanNuke fold 3.*expected layout.*pannuke"):
        get_federation("nuclei", image_size=64, data_dir=tmp_path / "b", manual_dir=broken)
