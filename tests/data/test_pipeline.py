import json

import jax
import numpy as np
import pytest

from fedfms_jax.data import get_federation
from fedfms_jax.data.pipeline import (AugmentConfig, FederatedLoader, augment, client_sharding,
                                      prefetch_to_device, to_device)

S = 32


class ArraySource:
    """Examples whose pixels encode (client, index), so a batch tells where each row came from."""

    def __init__(self, client, n, classes=1):
        self.client, self.n, self.classes = client, n, classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        image = np.zeros((S, S, 3), np.uint8)
        image[..., 0] = self.client + 1
        image[..., 1] = i
        image[0, 0, 2] = 200  # a corner marker to see geometric augmentation
        mask = np.zeros((S // 4, S // 4, self.classes), np.uint8)
        mask[0, 0, 0] = 1
        return {"image": image, "mask": mask, "case_id": f"{self.client}/{i}"}


def _ids(batch):
    """(client+1, index) of every valid row, -1 for padding."""
    out = np.where(batch["valid"], batch["image"][..., 0, 0, 1].astype(int), -1)
    return out


def _sources(sizes=(5, 9, 3)):
    return [ArraySource(c, n) for c, n in enumerate(sizes)]


def test_epoch_mode_covers_every_example_once_and_pads():
    loader = FederatedLoader(_sources(), 2, seed=3)
    assert loader.steps_per_round == 5 and loader.num_samples == [5, 9, 3]
    batches = list(loader)
    assert len(batches) == 5
    for bt in batches:
        assert bt["image"].shape == (3, 2, S, S, 3) and bt["image"].dtype == np.uint8
        assert bt["mask"].shape == (3, 2, S // 4, S // 4, 1) and bt["valid"].dtype == bool
        # padded rows are zeros
        assert not bt["image"][~bt["valid"]].any()
        np.testing.assert_array_equal(bt["image"][bt["valid"]][:, 0, 0, 0] - 1,
                                      np.nonzero(bt["valid"])[0])
    ids = np.stack([_ids(b) for b in batches])  # [steps, clients, B]
    for c, n in enumerate([5, 9, 3]):
        seen = ids[:, c][ids[:, c] >= 0]
        assert sorted(seen.tolist()) == list(range(n))
    # client 2 (3 examples) has one full and one half batch, then nothing
    assert ids[:, 2].tolist()[2:] == [[-1, -1]] * 3
    assert (ids[1, 2] >= 0).tolist() == [True, False]


def test_drop_remainder_and_shuffle_differs_per_epoch():
    loader = FederatedLoader(_sources(), 2, seed=0, drop_remainder=True)
    assert loader.steps_per_round == 4
    r0 = np.stack([_ids(b) for b in loader])
    r1 = np.stack([_ids(b) for b in loader])
    assert (r0 >= 0).sum() == 2 * (2 + 4 + 1)
    assert not np.array_equal(r0, r1)  # new permutation each epoch
    unshuffled = FederatedLoader(_sources(), 2, seed=0, shuffle=False)
    assert _ids(next(iter(unshuffled)))[1].tolist() == [0, 1]


def test_steps_mode_cycles_epochs():
    loader = FederatedLoader(_sources(), 2, seed=1, mode="steps", steps=7)
    rb = loader.round_batches(0)
    assert rb["image"].shape == (7, 3, 2, S, S, 3) and rb["valid"].shape == (7, 3, 2)
    ids = _ids(rb)
    # client 2: 3 examples -> batches per epoch 2: [x,x], [x,pad], then a new epoch
    assert (ids[:, 2] >= 0).sum(axis=1).tolist() == [2, 1, 2, 1, 2, 1, 2]
    assert sorted(ids[0:2, 2][ids[0:2, 2] >= 0].tolist()) == [0, 1, 2]
    assert loader.state()["round"] == 1


def test_same_seed_same_batches_other_seed_differs():
    aug = AugmentConfig(flip=True, rot90=True, intensity=0.2)
    fed = get_federation("synthetic", image_size=S, num_sites=3, images_per_site=[6, 4, 5])
    srcs = [fed.train(s) for s in fed.sites]
    a = FederatedLoader(srcs, 2, seed=5, augment=aug).round_batches(0)
    b = FederatedLoader(srcs, 2, seed=5, augment=aug).round_batches(0)
    c = FederatedLoader(srcs, 2, seed=6, augment=aug).round_batches(0)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"])


def test_resume_after_state_roundtrip_mid_round():
    aug = AugmentConfig(intensity=0.1)
    ref = FederatedLoader(_sources(), 2, seed=9, augment=aug)
    expected = [b for _ in range(3) for b in ref]  # three rounds, straight through
    run = FederatedLoader(_sources(), 2, seed=9, augment=aug)
    got = list(run)  # round 0
    it = iter(run)
    got += [next(it), next(it)]  # two steps into round 1
    saved = json.loads(json.dumps(run.state()))
    assert saved["round"] == 1 and saved["step"] == 2
    assert saved["clients"][0] == {"epoch": 1, "position": 4}
    restarted = FederatedLoader(_sources(), 2, seed=9, augment=aug)
    restarted.restore(saved)
    got += list(restarted) + list(restarted)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for k in e:
            np.testing.assert_array_equal(g[k], e[k])


def test_restore_rejects_other_seed_or_data():
    state = FederatedLoader(_sources(), 2, seed=1).state()
    with pytest.raises(ValueError, match="seed"):
        FederatedLoader(_sources(), 2, seed=2).restore(state)
    with pytest.raises(ValueError, match="num_samples"):
        FederatedLoader(_sources((5, 9, 4)), 2, seed=1).restore(state)


def test_augment_moves_image_and_mask_together():
    image = np.zeros((S, S, 3), np.uint8)
    image[:4, :4] = 255  # top-left 4x4 block = mask cell (0, 0)
    mask = np.zeros((S // 4, S // 4, 1), np.uint8)
    mask[0, 0] = 1
    for seed in range(12):
        im, m = augment(image, mask, np.random.default_rng(seed), AugmentConfig(intensity=0.0))
        r, c = np.argwhere(m[..., 0])[0]
        assert im[4 * r:4 * r + 4, 4 * c:4 * c + 4].min() == 255
        assert im.sum() == image.sum()


def test_intensity_augment_is_monotone_lut():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    mask = np.zeros((4, 4, 1), np.uint8)
    im, _ = augment(image, mask, np.random.default_rng(0), AugmentConfig(False, False, 0.3))
    assert not np.array_equal(im, image)
    assert np.all(np.diff(im[..., 0].ravel().astype(int)) >= 0)


def test_prefetch_to_device_shards_clients(four_devices):
    mesh = jax.make_mesh((4,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,))
    loader = FederatedLoader(_sources((5, 9, 3, 4)), 2, seed=0)
    host = [b for b in FederatedLoader(_sources((5, 9, 3, 4)), 2, seed=0)]
    dev = list(prefetch_to_device(iter(loader), client_sharding(mesh)))
    assert len(dev) == len(host)
    for d, h in zip(dev, host):
        assert d["image"].dtype == np.uint8
        assert len(d["image"].sharding.device_set) == 4
        assert d["image"].addressable_shards[1].data.shape == (1, 2, S, S, 3)
        np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])
    stacked = to_device(loader.round_batches(1), client_sharding(mesh, stacked=True))
    assert stacked["image"].addressable_shards[0].data.shape[:2] == (loader.steps_per_round, 1)


def test_prefetch_propagates_errors():
    def bad():
        yield {"x": np.zeros(4)}
        raise RuntimeError("broken source")
    it = prefetch_to_device(bad(), jax.devices()[0])
    next(it)
    with pytest.raises(RuntimeError, match="broken source"):
        next(it)
