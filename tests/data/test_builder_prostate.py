import numpy as np
import pytest

from fedfms_jax.data import DataError, get_federation
from tests.data import fake_raw

SITES = ["BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("prostate_raw")
    rng = np.random.default_rng(0)
    for s, site in enumerate(SITES):
        for c in range(3 if site != "UCL" else 1):
            vol, lab = fake_raw.blob_volume(rng, (20, 24, 5), fg_slices=[1, 2, 3], value=2 if site == "ISBI" else 1)
            if site == "HK":  # the original's preprocessed layout
                fake_raw.nifti(root / site / "images" / f"Case{c:02d}.nii.gz", vol)
                fake_raw.nifti(root / site / "labels" / f"Case{c:02d}.nii.gz", lab)
            else:  # SAML release
                fake_raw.nifti(root / site / f"Case{c:02d}.nii.gz", vol)
                seg = "Segmentation" if site == "I2CVB" else "segmentation"
                fake_raw.nifti(root / site / f"Case{c:02d}_{seg}.nii.gz", lab)
    return root


def test_prostate_builder(raw, tmp_path):
    fed = get_federation("prostate", image_size=64, data_dir=tmp_path, manual_dir=raw)
    assert fed.sites == SITES and fed.num_classes == 1
    for site in SITES:
        train, val = fed.train(site), fed.val(site)
        n_cases = 1 if site == "UCL" else 3
        assert len(train) + len(val) == 5 * n_cases  # every slice kept, as the original
        assert len(val) == (0 if site == "UCL" else 5)  # one whole volume
        tr_cases = {train[i]["case_id"].split("/")[0] for i in range(len(train))}
        va_cases = {val[i]["case_id"].split("/")[0] for i in range(len(val))}
        assert not tr_cases & va_cases  # patient-disjoint
        ex = train[0]
        assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
        assert ex["mask"].shape == (16, 16, 1) and ex["mask"].dtype == np.uint8
        masks = np.stack([train[i]["mask"] for i in range(len(train))])
        assert set(np.unique(masks)) == {0, 1}
        img = np.stack([train[i]["image"] for i in range(len(train))]).astype(float)
        np.testing.assert_array_equal(img[..., 0], img[..., 2])  # grey -> 3 channels
        # 99th-percentile clip: the hot pixel does not squash the tissue to black
        assert img.mean() > 40
        fg = np.repeat(np.repeat(masks[..., 0], 4, 1), 4, 2).astype(bool)
        assert img[..., 0][fg].mean() > img[..., 0][~fg].mean() + 50
    # a second call reuses the prepared data
    again = get_federation("prostate", image_size=64, data_dir=tmp_path, manual_dir=None)
    np.testing.assert_array_equal(again.train("HK")[0]["image"], fed.train("HK")[0]["image"])


def test_prostate_missing_and_broken(raw, tmp_path):
    with pytest.raises(DataError, match=r"liuquande.github.io/SAML") as e:
        get_federation("prostate", image_size=64, data_dir=tmp_path / "a", manual_dir=tmp_path / "nothing")
    assert "\n" not in str(e.value.message)
    broken = tmp_path / "raw"
    import shutil
    shutil.copytree(raw, broken)
    (broken / "UCL" / "Case00_segmentation.nii.gz").unlink()
    with pytest.raises(DataError, match=r"Case00_segmentation.nii.gz"):
        get_federation("prostate", image_size=64, data_dir=tmp_path / "b", manual_dir=broken)
    (broken / "UCL" / "Case00_segmentation.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"UCL/Case00_segmentation.nii.gz"):
        get_federation("prostate", image_size=64, data_dir=tmp_path / "c", manual_dir=broken)


def test_split_options_and_unknown_option(raw, tmp_path):
    fed = get_federation("prostate", image_size=32, data_dir=tmp_path, manual_dir=raw, val_fraction=0.5,
                         split_seed=3)
    assert len(fed.val("BIDMC")) == 10  # round(0.5 * 3) = 2 of 3 volumes
    with pytest.raises(TypeError, match="modality"):
        get_federation("prostate", image_size=32, data_dir=tmp_path, manual_dir=raw, modality="t2")


def test_prostate_slice_orientation_and_original_split(raw, tmp_path):
    from fedfms_jax.data import preprocess
    from fedfms_jax.data.federations import builder_options
    opts = dict(val_split="original", resize="cv2")
    xy = get_federation("prostate", image_size=64, data_dir=tmp_path, manual_dir=raw,
                        **builder_options("prostate", slice_orientation="xy", **opts))
    yx = get_federation("prostate", image_size=64, data_dir=tmp_path, manual_dir=raw,
                        **builder_options("prostate", slice_orientation="yx", **opts))
    for site in SITES:  # n // 10 + 1 = 1 whole volume of 5 slices (UCL's only one, as the original)
        assert len(xy.val(site)) == 5 and len(xy.train(site)) == (0 if site == "UCL" else 10)
    ex_xy = {e["case_id"]: e for e in (xy.train("HK")[i] for i in range(10))}
    ex_yx = {e["case_id"]: e for e in (yx.train("HK")[i] for i in range(10))}
    assert ex_xy.keys() == ex_yx.keys()
    case_id = sorted(ex_xy)[2]  # a slice with prostate
    volume, z = case_id.split("/")
    vol = preprocess.clip_scale(preprocess.read_nifti(raw / "HK" / "images" / f"{volume}.nii.gz"))
    lab = preprocess.read_nifti(raw / "HK" / "labels" / f"{volume}.nii.gz")
    rows_x = vol[:, :, int(z)]  # [X, Y] = [20, 24]: rows are X, as nibabel's vol[:, :, z]
    np.testing.assert_array_equal(ex_xy[case_id]["image"], preprocess.resize_image(preprocess.to_rgb(rows_x), 64, "cv2"))
    np.testing.assert_array_equal(ex_xy[case_id]["mask"][..., 0],
                                  preprocess.resize_mask(lab[:, :, int(z)] > 0.5, 16, "cv2")[..., 0])
    assert ex_xy[case_id]["mask"].any()
    for key in ex_xy:  # "yx" is the same slice transposed: [Y, X]
        np.testing.assert_array_equal(ex_yx[key]["image"], ex_xy[key]["image"].transpose(1, 0, 2))


def test_one_site_build_reads_only_that_site(raw, tmp_path):
    """A hospital holding only its own folder builds its site alone: the same split and
    examples as in the whole federation's build, under a builder config of its own."""
    import shutil
    whole = get_federation("prostate", image_size=32, data_dir=tmp_path / "all", manual_dir=raw)
    own = tmp_path / "hospital"
    shutil.copytree(raw / "ISBI_1.5", own / "ISBI_1.5")
    one = get_federation("prostate", image_size=32, data_dir=tmp_path / "all", manual_dir=own,
                         sites=("ISBI_1.5",))
    assert one.sites == ["ISBI_1.5"]
    for part in ("train", "val"):
        a, b = getattr(whole, part)("ISBI_1.5"), getattr(one, part)("ISBI_1.5")
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            assert a[i]["case_id"] == b[i]["case_id"]
            np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
            np.testing.assert_array_equal(a[i]["mask"], b[i]["mask"])
    with pytest.raises(DataError, match=r"missing site folder .*HK.*expected layout") as e:
        get_federation("prostate", image_size=32, data_dir=tmp_path / "x", manual_dir=own, sites=("HK",))
    assert "\n" not in e.value.message
    with pytest.raises(ValueError, match="no site.*Mars"):
        get_federation("prostate", image_size=32, data_dir=tmp_path / "x", manual_dir=own, sites=("Mars",))
