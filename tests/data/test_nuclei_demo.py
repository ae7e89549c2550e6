import numpy as np
import pytest
import tifffile

from fedfms_jax.data import assets, get_federation, preprocess
from tests.data.checks import check_federation, examples

SITES = ["stardist_left", "stardist_right", "napari_upper", "napari_middle", "napari_deep"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    # the wheel files come from the asset cache (downloaded once, sha256-verified)
    return get_federation("nuclei_demo", image_size=64, data_dir=tmp_path_factory.mktemp("demo"))


def test_sites_shapes_and_splits(fed):
    data = check_federation(fed, SITES, 1, 64)
    assert fed.unseen == "napari_deep"
    sizes = {s: len(tr) + len(va) for s, (tr, va) in data.items()}
    assert sizes == {"stardist_left": 8, "stardist_right": 8, "napari_upper": 12, "napari_middle": 12,
                     "napari_deep": 13}
    assert all(len(va) >= 1 for _, va in data.values())


def test_masks_are_the_binarised_instance_labels(fed):
    labels = tifffile.imread(assets.fetch(assets.NAPARI_NUCLEI_LABELS))
    sd_labels = tifffile.imread(assets.fetch(assets.STARDIST_MASK))
    checked = 0
    for site in SITES:
        for ex in examples(fed.all(site)):
            cid = ex["case_id"]
            if site.startswith("napari"):
                ref = labels[int(cid.split("/")[1])] > 0
            else:
                y, x = int(cid[1:4]), int(cid[5:8])
                ref = sd_labels[y:y + 128, x:x + 128] > 0
            np.testing.assert_array_equal(ex["mask"][..., 0], preprocess.resize_mask(ref, 16)[..., 0])
            checked += 1
    assert checked == 53


def test_sites_differ_in_appearance(fed):
    def stats(site):
        ex = examples(fed.all(site))
        return (np.mean([e["image"].mean() for e in ex]), np.mean([e["mask"].mean() for e in ex]))
    deep, middle, left = stats("napari_deep"), stats("napari_middle"), stats("stardist_left")
    assert middle[0] - deep[0] > 15  # the deep slices are darker
    assert middle[1] > 2 * deep[1]  # and hold far fewer nuclei
    assert abs(left[0] - middle[0]) > 15  # the two instruments look different


def test_deterministic_rebuild(fed, tmp_path):
    again = get_federation("nuclei_demo", image_size=64, data_dir=tmp_path)
    for site in ("stardist_right", "napari_deep"):
        a = {e["case_id"]: e for e in examples(fed.train(site))}
        b = {e["case_id"]: e for e in examples(again.train(site))}
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k]["image"], b[k]["image"])


def test_loader_over_tfds_sources(fed):
    from fedfms_jax.data.pipeline import AugmentConfig, FederatedLoader
    train_sites = [s for s in fed.sites if s != fed.unseen]
    with FederatedLoader([fed.train(s) for s in train_sites], 4, seed=0, augment=AugmentConfig()) as loader:
        rb = loader.round_batches(0)
        assert rb["image"].shape[1:] == (4, 4, 64, 64, 3)
        assert rb["valid"].sum(axis=(0, 2)).tolist() == [len(fed.train(s)) for s in train_sites]
        assert rb["mask"][rb["valid"]].any(axis=(1, 2, 3)).all()  # every demo image holds nuclei
