"""Assertions shared by the builder tests."""
import numpy as np


def patient(case_id: str) -> str:
    return case_id.split("/")[0]


def examples(source):
    return [source[i] for i in range(len(source))]


def check_federation(fed, sites, num_classes, size):
    """Sites, shapes, dtypes, {0,1} masks and patient-disjoint train/val for every site."""
    assert fed.sites == list(sites)
    assert fed.num_classes == num_classes
    for site in fed.sites:
        train, val = examples(fed.train(site)), examples(fed.val(site))
        assert train, site
        for ex in train + val:
            assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
            assert ex["mask"].shape == (size // 4, size // 4, num_classes) and ex["mask"].dtype == np.uint8
            assert set(np.unique(ex["mask"])) <= {0, 1}
            assert isinstance(ex["case_id"], str)
        assert not {patient(e["case_id"]) for e in train} & {patient(e["case_id"]) for e in val}, site
        assert len(fed.all(site)) == len(train) + len(val)
    return {s: (examples(fed.train(s)), examples(fed.val(s))) for s in fed.sites}


def upsampled(mask, factor=4):
    return np.repeat(np.repeat(mask, factor, 0), factor, 1)
