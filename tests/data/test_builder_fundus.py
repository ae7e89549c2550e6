import numpy as np
import pytest

from fedfms_jax.data import DataError, get_federation
from tests.data import fake_raw
from tests.data.checks import check_federation

SITES = ["REFUGE", "ORIGA", "G1020", "Drishti-GS1"]


def _disc_cup(h, w):
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    return r < h / 3, r < h / 6


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("fundus_raw")
    rng = np.random.default_rng(0)
    for site in SITES:
        for i in range(4):
            h, w = 40, 48
            img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
            disc, cup = _disc_cup(h, w)
            img[disc] = 150
            img[cup] = 230
            stem = f"{site[0].lower()}{i:04d}"
            if site == "REFUGE":  # release: grey coding 255 bg / 128 rim / 0 cup, BMP, class subfolders
                sub = "Glaucoma" if i % 2 else "Non-Glaucoma"
                fake_raw.image(root / site / "images" / sub / f"{stem}.jpg", img, quality=95)
                lab = np.full((h, w), 255, np.uint8)
                lab[disc], lab[cup] = 128, 0
                fake_raw.image(root / site / "labels" / sub / f"{stem}.bmp", lab)
            elif site == "Drishti-GS1":  # soft maps, one per structure
                fake_raw.image(root / site / "images" / f"{stem}.png", img)
                fake_raw.image(root / site / "labels" / f"{stem}_ODsegSoftmap.png", (disc * 255).astype(np.uint8))
                fake_raw.image(root / site / "labels" / f"{stem}_cupsegSoftmap.png", (cup * 180).astype(np.uint8))
            else:  # the original's index coding 0 bg / 1 rim / 2 cup
                fake_raw.image(root / site / "images" / f"{stem}.jpg", img, quality=95)
                lab = np.zeros((h, w), np.uint8)
                lab[disc], lab[cup] = 1, 2
                fake_raw.image(root / site / "labels" / f"{stem}.png", lab)
    return root


def test_fundus_builder(raw, tmp_path):
    fed = get_federation("fundus", image_size=64, data_dir=tmp_path, manual_dir=raw)
    data = check_federation(fed, SITES, 2, 64)
    for site, (train, val) in data.items():
        assert len(train) == 3 and len(val) == 1
        for ex in train + val:
            disc, cup = ex["mask"][..., 0].astype(bool), ex["mask"][..., 1].astype(bool)
            assert cup.any() and (disc & ~cup).any()
            assert not (cup & ~disc).any()  # the cup lies inside the disc
            # the mask marks the bright structures of the image
            small = ex["image"][2::4, 2::4, 0].astype(float)
            assert small[cup].mean() > small[disc & ~cup].mean() > small[~disc].mean()
    rim = get_federation("fundus", image_size=64, data_dir=tmp_path, manual_dir=raw, disc_excludes_cup=True)
    ex = rim.train("ORIGA")[0]
    assert not (ex["mask"][..., 0] & ex["mask"][..., 1]).any() and ex["mask"][..., 0].any()


def test_fundus_errors(raw, tmp_path):
    import shutil
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    (broken / "G1020" / "labels" / "g0002.png").unlink()
    with pytest.raises(DataError, match=r"G1020/labels/g0002"):
        get_federation("fundus", image_size=64, data_dir=tmp_path / "a", manual_dir=broken)
    (broken / "G1020" / "labels" / "g0002.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"cannot read image .*G1020/labels/g0002.png"):
        get_federation("fundus", image_size=64, data_dir=tmp_path / "b", manual_dir=broken)
    shutil.rmtree(broken / "ORIGA")
    with pytest.raises(DataError, match=r"missing site folder .*ORIGA.*expected layout.*REFUGE"):
        get_federation("fundus", image_size=64, data_dir=tmp_path / "c", manual_dir=broken)


def test_fundus_protocol_fedfms_rim_and_original_split(raw, tmp_path):
    from fedfms_jax.data.federations import builder_options
    full = get_federation("fundus", image_size=64, data_dir=tmp_path, manual_dir=raw,
                          **builder_options("fundus", fundus_disc="full", val_split="original"))
    rim = get_federation("fundus", image_size=64, data_dir=tmp_path, manual_dir=raw,
                         **builder_options("fundus", fundus_disc="rim", val_split="original"))
    for site in SITES:
        assert len(rim.train(site)) == 4 and len(rim.val(site)) == 0  # int(0.1 * 4) = 0 images
        for i in range(4):
            f, r = full.train(site)[i], rim.train(site)[i]
            assert f["case_id"] == r["case_id"]
            disc, cup = f["mask"][..., 0].astype(bool), f["mask"][..., 1].astype(bool)
            np.testing.assert_array_equal(r["mask"][..., 0], disc & ~cup)  # the rim: disc minus cup
            np.testing.assert_array_equal(r["mask"][..., 1], cup)
            assert (disc & cup).any()
