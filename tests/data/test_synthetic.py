import numpy as np
import pytest

from fedfms_jax.data import get_federation


def test_synthetic_federation_shapes_and_determinism():
    fed = get_federation("synthetic", image_size=64, num_sites=5, images_per_site=[8, 4, 6, 10, 3],
                         num_classes=2, seed=1)
    assert fed.sites == [f"site{i}" for i in range(5)] and fed.num_classes == 2
    assert [len(fed.train(s)) + len(fed.val(s)) for s in fed.sites] == [8, 4, 6, 10, 3]
    assert len(fed.all("site3")) == 10
    ex = fed.train("site0")[1]
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (16, 16, 2) and ex["mask"].dtype == np.uint8
    assert set(np.unique(ex["mask"])) <= {0, 1} and ex["mask"].any()
    assert isinstance(ex["case_id"], str)
    again = get_federation("synthetic", image_size=64, num_sites=5, images_per_site=[8, 4, 6, 10, 3],
                           num_classes=2, seed=1).train("site0")[1]
    np.testing.assert_array_equal(ex["image"], again["image"])
    other = get_federation("synthetic", image_size=64, num_sites=5, num_classes=2, seed=2).train("site0")[1]
    assert not np.array_equal(ex["image"], other["image"])
    # train and val hold different images; all() = train then val
    np.testing.assert_array_equal(fed.all("site0")[len(fed.train("site0"))]["image"], fed.val("site0")[0]["image"])
    with pytest.raises(IndexError):
        fed.train("site4")[len(fed.train("site4"))]


def test_synthetic_sites_differ_in_appearance_and_mask_matches_shapes():
    fed = get_federation("synthetic", image_size=128, num_sites=4, images_per_site=6)
    bg_means = []
    for s in fed.sites:
        ims = np.stack([fed.train(s)[i]["image"] for i in range(3)]).astype(float)
        msk = np.stack([fed.train(s)[i]["mask"][..., 0] for i in range(3)]).astype(bool)
        small = ims[:, 2::4, 2::4].mean(-1)
        fg, bg = small[msk].mean(), small[~msk].mean()
        assert abs(fg - bg) > 20  # foreground really is a different intensity
        bg_means.append(bg)
    assert np.ptp(bg_means) > 15  # sites look different


def test_unknown_federation():
    with pytest.raises(KeyError, match="unknown federation"):
        get_federation("nope", image_size=64)
