"""Evaluation of a global (or per-site) model on a federation: the jitted eval step,
one source, every site of a run (validation splits of the trained sites, all data of
the unseen site), and the table printed for it. Used by training, the `evaluate`
command and a deployed site alike."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax import metrics
from fedfms_jax.overlays import save_overlays


def make_eval_step(graphdef, partition, forward):
    """jitted (trainable, frozen, rest, images, masks) -> (stats [B,K,6,3], logits)."""

    @jax.jit
    def step(trainable, frozen, rest, images, masks):
        model = nnx.merge(graphdef, partition.merge(trainable, frozen), rest)
        logits = forward(model, images).astype(jnp.float32)
        return metrics.image_stats(logits, masks), logits

    return step


def eval_indices(n: int, limit: int) -> np.ndarray:
    """All indices, or `limit` evenly spread ones (deterministic)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def evaluate_source(step, params, source, *, num_classes: int, batch_size: int, limit: int = 0,
                    num_keep: int = 0):
    """Evaluate one source. Returns (metric block, kept examples for overlays)."""
    trainable, frozen, rest = params
    acc = metrics.MetricAccumulator(num_classes, class_names=_class_names(num_classes))
    kept = {"image": [], "mask": [], "logits": []}
    idx = eval_indices(len(source), limit)
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        exs = [source[int(i)] for i in chunk]
        images = np.stack([np.asarray(e["image"]) for e in exs])
        masks = np.stack([np.asarray(e["mask"]) for e in exs])
        valid = np.ones(len(chunk), bool)
        pad = batch_size - len(chunk)
        if pad:  # fixed batch shape: one compile for every site
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            masks = np.concatenate([masks, np.zeros((pad, *masks.shape[1:]), masks.dtype)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        stats, logits = step(trainable, frozen, rest, images, masks)
        acc.update(np.asarray(stats), valid)
        room = num_keep - len(kept["image"])
        if room > 0:
            take = min(room, len(chunk))
            kept["image"] += [np.asarray(e.get("pixels", e["image"])) for e in exs[:take]]
            kept["mask"] += list(masks[:take])
            kept["logits"] += list(np.asarray(logits[:take]))
    return acc.result(), kept


def _class_names(k: int):
    return ["disc", "cup"] if k == 2 else [f"class{c}" for c in range(k)]


def evaluate_federation(step, params_for_site, fed, train_sites, unseen_site, cfg: dict,
                        overlay_dir: Path | None = None, tag: str = "") -> dict:
    """Validation split of every trained site, full data of the unseen site.

    `params_for_site(site)` gives the (trainable, frozen, rest) to evaluate that site with
    (the global model, or the site's own model for local-only training).
    """
    kw = dict(num_classes=cfg["num_classes"], batch_size=cfg["eval_batch_size"],
              limit=cfg["max_eval_images"], num_keep=cfg["num_overlays"] if overlay_dir else 0)
    sites = {}
    for site in train_sites:
        block, kept = evaluate_source(step, params_for_site(site), fed.val(site), **kw)
        sites[site] = block
        if overlay_dir and kept["image"]:
            save_overlays(overlay_dir, site, tag, kept["image"], kept["mask"], kept["logits"])
    out = {"sites": sites, "average": metrics.average_blocks(sites)}
    if unseen_site is not None:
        block, kept = evaluate_source(step, params_for_site(unseen_site), fed.all(unseen_site), **kw)
        out["unseen"] = block
        if overlay_dir and kept["image"]:
            save_overlays(overlay_dir, f"unseen_{unseen_site}", tag, kept["image"], kept["mask"],
                          kept["logits"])
    return out


def format_table(result: dict, title: str = "") -> str:
    rows = [(name, b) for name, b in result.get("sites", {}).items()]
    if "unseen" in result:
        rows.append(("unseen", result["unseen"]))
    if result.get("average"):
        rows.append(("mean(sites)", dict(result["average"], n="")))
    lines = [title] if title else []
    lines.append(f"{'site':<28}{'n':>6}{'dice':>9}{'dice_thr':>10}{'iou':>9}{'iou_thr':>10}")
    for name, b in rows:
        if not b or "dice" not in b:
            continue
        lines.append(f"{name[:27]:<28}{str(b.get('n', '')):>6}{b['dice']:>9.4f}{b['dice_thresh_avg']:>10.4f}"
                     f"{b['iou']:>9.4f}{b['iou_thresh_avg']:>10.4f}")
    return "\n".join(lines)
