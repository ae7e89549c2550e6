"""The original FedFMS data rules behind the `protocol` fields: cv2-style resizing, the
validation split counts, and FedAvg's rounded client weights."""
import numpy as np
import pytest

from fedfms_jax.data import preprocess
from fedfms_jax.data.builders.base import Case, make_config
from fedfms_jax.federated.fedavg_weights import fedavg_weights


def test_cv2_linear_upscale_has_half_pixel_centres_and_clamped_borders():
    image = np.array([[0, 100], [0, 100]], np.uint8)
    out = preprocess.resize_linear_cv2(image, 4)
    # src x = (dst + 0.5) * 0.5 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    np.testing.assert_array_equal(out, [[0, 25, 75, 100]] * 4)


def test_cv2_linear_shrink_does_not_antialias():
    image = np.tile(np.array([0, 40, 80, 120], np.uint8), (4, 1))
    out = preprocess.resize_linear_cv2(image, 2)
    # src x = (dst + 0.5) * 2 - 0.5 = 0.5, 2.5: means of two neighbours, not of four pixels
    np.testing.assert_array_equal(out, [[20, 100], [20, 100]])
    rgb = np.repeat(image[..., None], 3, axis=-1)
    np.testing.assert_array_equal(preprocess.resize_image(rgb, 2, "cv2")[..., 1], out)
    assert not np.array_equal(preprocess.resize_image(rgb, 2, "pil")[..., 1], out)  # PIL antialiases


def test_cv2_linear_rounds_to_nearest_grey_level():
    out = preprocess.resize_linear_cv2(np.array([[0, 3], [0, 3]], np.uint8), 4)
    np.testing.assert_array_equal(out[0], [0, 1, 2, 3])  # 0.75 -> 1, 2.25 -> 2


def test_cv2_nearest_takes_floor_without_offset():
    mask = np.array([[1, 0, 0, 1]] * 4, np.uint8)
    # src = floor(dst * 2) = 0, 2; pixel centres would take 1, 3
    np.testing.assert_array_equal(preprocess.resize_mask(mask, 2, "cv2")[..., 0], [[1, 0], [1, 0]])
    np.testing.assert_array_equal(preprocess.resize_mask(mask, 2, "pil")[..., 0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(preprocess.nearest_index_cv2(2, 3), [0, 0, 1])  # floor(0, .67, 1.33)
    np.testing.assert_array_equal(preprocess.nearest_index_cv2(3, 8), [0, 0, 0, 1, 1, 1, 2, 2])


@pytest.mark.parametrize("n,unit,expected", [(23, "image", 2), (9, "image", 0), (10, "image", 1),
                                             (7, "volume", 1), (10, "volume", 2), (1, "volume", 1)])
def test_original_validation_counts(n, unit, expected):
    assert preprocess.original_val_count(n, unit) == expected
    train, val = preprocess.split_original([f"c{i}" for i in range(n)], unit, 0, "site")
    assert len(val) == expected and sorted(train + val) == list(range(n))


def test_original_split_of_2d_data_ignores_patients(tmp_path):
    from fedfms_jax.data.builders.ctlung import FedfmsCtlung

    def patient(name, k):
        images = tuple(Case(name, lambda: []) for _ in range(k))
        return Case(name, lambda: [], images=images)

    cases = [patient("p0", 8), patient("p1", 8), patient("p2", 7)]  # 23 images of 3 patients
    original = FedfmsCtlung(config=make_config(64, val_split="original"), data_dir=str(tmp_path))
    train, val = original.split_site("1", cases)
    assert len(val) == 2 and len(train) == 21  # int(0.1 * 23) images
    by_patient = FedfmsCtlung(config=make_config(64), data_dir=str(tmp_path))
    train, val = by_patient.split_site("1", cases)
    assert len(val) == 1 and len(train) == 2  # one whole patient


def test_rounded_client_weights():
    np.testing.assert_allclose(fedavg_weights([10, 20, 33], "rounded"), [0.16, 0.32, 0.52], atol=1e-7)
    exact = fedavg_weights([10, 20, 33], "exact")
    np.testing.assert_allclose(exact, np.array([10, 20, 33]) / 63, rtol=1e-6)
    # some clients of a deployed round: shares of all samples, the last takes the rest of theirs
    np.testing.assert_allclose(fedavg_weights([10, 20], "rounded", total=63), [0.16, 30 / 63 - 0.16], atol=1e-7)
    with pytest.raises(ValueError, match="rounded"):
        fedavg_weights([1, 2], "floor")
