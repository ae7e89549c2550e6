"""Metrics against per-image numpy computations written out independently."""
import numpy as np
import pytest

from fedfms_jax import metrics


def _ref_scores(logit, gt, cut):
    """Dice/IoU of one image and class, straight from the definitions."""
    p = logit > cut
    g = gt > 0.5
    tp = np.logical_and(p, g).sum()
    fp = np.logical_and(p, ~g).sum()
    fn = np.logical_and(~p, g).sum()
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


@pytest.mark.parametrize("xp_name", ["numpy", "jax"])
def test_scores_match_definitions(xp_name):
    rng = np.random.default_rng(0)
    b, h, w, k = 5, 12, 10, 2
    logits = rng.normal(0.3, 1.0, (b, h, w, k)).astype(np.float32)
    gt = (rng.random((b, h, w, k)) < 0.3).astype(np.float32)
    gt[1, ..., 0] = 0
    logits[1, ..., 0] = -5.0  # empty prediction and empty ground truth: scores 1
    if xp_name == "jax":
        import jax.numpy as jnp
        stats = np.asarray(metrics.image_stats(jnp.asarray(logits), jnp.asarray(gt)))
    else:
        stats = metrics.image_stats(logits, gt, xp=np)
    acc = metrics.MetricAccumulator(k, ["a", "b"])
    acc.update(stats[:3])
    acc.update(stats[3:])
    res = acc.result()

    std = np.array([[_ref_scores(logits[i, ..., c], gt[i, ..., c], 0.0) for c in range(k)] for i in range(b)])
    thr = np.array([[[_ref_scores(logits[i, ..., c], gt[i, ..., c], t) for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
                     for c in range(k)] for i in range(b)])
    assert res["n"] == b
    np.testing.assert_allclose(res["dice"], std[..., 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(res["iou"], std[..., 1].mean(), rtol=1e-5)
    np.testing.assert_allclose(res["dice_thresh_avg"], thr[..., 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(res["iou_thresh_avg"], thr[..., 1].mean(), rtol=1e-5)
    np.testing.assert_allclose(res["per_class"]["b"]["dice"], std[:, 1, 0].mean(), rtol=1e-5)
    # The thresholds apply to raw logits, not probabilities: they differ here.
    assert abs(res["dice_thresh_avg"] - res["dice"]) > 1e-4


def test_valid_rows_and_labels():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
    labels = (rng.random((4, 8, 8)) < 0.5).astype(np.uint8)
    gt = metrics.as_class_masks(labels, 1)
    stats = metrics.image_stats(logits, gt, xp=np)
    acc = metrics.MetricAccumulator(1)
    acc.update(stats, valid=[True, False, True, False])
    expected = np.mean([_ref_scores(logits[i, ..., 0], labels[i], 0.0)[0] for i in (0, 2)])
    np.testing.assert_allclose(acc.result()["dice"], expected, rtol=1e-6)
    assert acc.result()["n"] == 2
    two = metrics.as_class_masks(np.array([[[0, 1], [2, 1]]]), 2)
    assert two.shape == (1, 2, 2, 2) and two[0, ..., 0].sum() == 2 and two[0, ..., 1].sum() == 1


def test_average_blocks_skips_empty_sites():
    blocks = {"a": {"dice": 0.2, "iou": 0.1, "dice_thresh_avg": 0.3, "iou_thresh_avg": 0.2, "n": 3},
              "b": {"dice": 0.6, "iou": 0.5, "dice_thresh_avg": 0.5, "iou_thresh_avg": 0.4, "n": 1},
              "c": {"n": 0}}
    avg = metrics.average_blocks(blocks)
    assert avg["dice"] == pytest.approx(0.4) and avg["iou_thresh_avg"] == pytest.approx(0.3)
