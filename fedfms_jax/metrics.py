"""Segmentation metrics: Dice and IoU, standard and as the original computes them.

* `dice`/`iou`: the prediction is sigmoid(logit) > 0.5, i.e. logit > 0.
* `dice_thresh_avg`/`iou_thresh_avg`: the FedFMS/MSA evaluation, which binarises the
  *raw logits* at each of (0.1, 0.3, 0.5, 0.7, 0.9) and averages the scores over the
  thresholds. Kept for comparability with the published figures.

Scores are computed per image and class, then averaged over images. An image whose
prediction and ground truth are both empty scores 1 (the smoothing term of the original).
`image_stats` runs inside jit on device and returns only small per-image counts.
"""
from __future__ import annotations

import numpy as np

THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
SMOOTH = 1e-6


def _resize_logits(logits, size, xp):
    if tuple(logits.shape[1:3]) == tuple(size):
        return logits
    import jax
    b, _, _, k = logits.shape
    return jax.image.resize(logits, (b, size[0], size[1], k), method="bilinear")


def as_class_masks(masks, num_classes: int, xp=np):
    """[B,H,W] (binary or integer labels) or [B,H,W,K] -> float [B,H,W,K] in {0,1}."""
    if masks.ndim == 4:
        return (masks > 0.5).astype(xp.float32)
    if num_classes == 1:
        return (masks > 0)[..., None].astype(xp.float32)
    # Integer labels: class c is label c+1 (0 is background).
    return xp.stack([(masks == c + 1) for c in range(num_classes)], axis=-1).astype(xp.float32)


def image_stats(logits, masks, xp=None):
    """Per-image counts [B, K, 1 + len(THRESHOLDS), 3] = (intersection, pred sum, gt sum).

    Index 0 on the threshold axis is the standard cut (logit > 0); the rest are the
    original's raw-logit thresholds. `logits` [B,h,w,K]; `masks` [B,H,W,K] in {0,1};
    logits are resized (bilinear) to the mask size if they differ.
    """
    if xp is None:
        import jax.numpy as xp
    logits = _resize_logits(logits, masks.shape[1:3], xp)
    gt = (masks > 0.5).astype(xp.float32)
    cuts = xp.asarray((0.0,) + THRESHOLDS, dtype=xp.float32)
    pred = (logits[..., None] > cuts).astype(xp.float32)  # [B,H,W,K,T]
    g = gt[..., None]
    inter = xp.sum(pred * g, axis=(1, 2))
    psum = xp.sum(pred, axis=(1, 2))
    gsum = xp.broadcast_to(xp.sum(g, axis=(1, 2)), psum.shape)
    return xp.stack([inter, psum, gsum], axis=-1)


def scores_from_stats(stats: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image, per-class scores [B,K] from `image_stats` counts."""
    stats = np.asarray(stats, dtype=np.float64)
    inter, psum, gsum = stats[..., 0], stats[..., 1], stats[..., 2]
    dice = (2 * inter + SMOOTH) / (psum + gsum + SMOOTH)
    iou = (inter + SMOOTH) / (psum + gsum - inter + SMOOTH)
    return {
        "dice": dice[..., 0], "iou": iou[..., 0],
        "dice_thresh_avg": dice[..., 1:].mean(-1), "iou_thresh_avg": iou[..., 1:].mean(-1),
    }


class MetricAccumulator:
    """Collects per-image counts across batches; `result()` gives the averaged block."""

    def __init__(self, num_classes: int, class_names=None):
        self.num_classes = num_classes
        self.class_names = list(class_names or [f"class{c}" for c in range(num_classes)])
        self._stats: list[np.ndarray] = []

    def update(self, stats, valid=None) -> None:
        stats = np.asarray(stats)
        if valid is not None:  # drop padding images of the last batch
            stats = stats[np.asarray(valid, dtype=bool)]
        self._stats.append(stats)

    @property
    def count(self) -> int:
        return int(sum(s.shape[0] for s in self._stats))

    def result(self) -> dict:
        if not self._stats:
            return {"n": 0}
        scores = scores_from_stats(np.concatenate(self._stats))
        out: dict = {k: float(v.mean()) for k, v in scores.items()}
        out["n"] = self.count
        if self.num_classes > 1:
            out["per_class"] = {
                name: {k: float(v[:, c].mean()) for k, v in scores.items()}
                for c, name in enumerate(self.class_names)
            }
        return out


def average_blocks(blocks: dict[str, dict]) -> dict:
    """Unweighted mean over sites of each scalar metric (sites with n == 0 are skipped)."""
    keys = ("dice", "iou", "dice_thresh_avg", "iou_thresh_avg")
    good = [b for b in blocks.values() if b.get("n", 0) > 0]
    if not good:
        return {}
    return {k: float(np.mean([b[k] for b in good])) for k in keys}
