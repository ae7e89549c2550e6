"""End to end on the tiny config: outputs, re-evaluation and prediction."""
import json

import numpy as np
import pytest

from fedfms_jax import evaluate, predict
from tests.train.conftest import TINY, TINY_RUN_GROUP, snapshot

pytestmark = [pytest.mark.slow, TINY_RUN_GROUP]
BLOCK_KEYS = {"dice", "dice_thresh_avg", "iou", "iou_thresh_avg", "n"}


def test_outputs_have_documented_keys(tiny_run):
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["rounds"] == 2 and cfg["tiny"] is True and cfg["model"]["encoder"] == "vit_tiny"
    records = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for rec in records[1:]:
        assert set(rec["client_loss"]) == {"site1", "site2", "site3"}
        assert all(np.isfinite(v) for v in rec["client_loss"].values())
        assert rec["comm_bytes"]["up_per_client"] > 0 and rec["seconds"] >= 0
        assert set(rec["eval"]["sites"]) == {"site1", "site2", "site3"}
    res = json.loads((tiny_run / "results.json").read_text())
    assert res["rounds"] == 2 and res["unseen_site"] == "site0"
    for key in ("initial", "final"):
        assert BLOCK_KEYS <= set(res[key]["unseen"])
        assert set(res[key]["sites"]) == {"site1", "site2", "site3"}
        for block in res[key]["sites"].values():
            assert BLOCK_KEYS <= set(block) and 0 <= block["dice"] <= 1
    assert res["final"] == {k: records[-1]["eval"][k] for k in ("sites", "average", "unseen")}
    assert res["initial"]["unseen"] == records[0]["eval"]["unseen"]
    assert res["comm_bytes_per_round_per_client"] > 0 and res["train_seconds"] > 0
    pngs = sorted(p.name for p in (tiny_run / "overlays").glob("*.png"))
    assert any(n.startswith("site1_final") for n in pngs) and any(n.startswith("unseen_") for n in pngs)
    assert sorted(int(p.name) for p in (tiny_run / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    # Learning curves: the Dice plot and TensorBoard events of rounds 0-2.
    from PIL import Image
    from tests.train.test_curves import event_scalars
    with Image.open(tiny_run / "dice.png") as im:
        assert im.format == "PNG"
    scalars = event_scalars(tiny_run / "tensorboard")
    assert [step for step, _ in scalars["dice/unseen"]] == [0, 1, 2]
    assert [step for step, _ in scalars["loss/site1"]] == [1, 2]


def test_rerun_of_finished_run_changes_no_state(tiny_run):
    from fedfms_jax import train
    before = snapshot(tiny_run / "checkpoints")
    assert train.main([*TINY, "--workdir", str(tiny_run)]) == 0
    assert snapshot(tiny_run / "checkpoints") == before


def test_evaluate_reproduces_final_metrics(tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    assert evaluate.main(["--workdir", str(tiny_run), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    final = json.loads((tiny_run / "results.json").read_text())["final"]
    assert got["round"] == 2
    for site, block in final["sites"].items():
        np.testing.assert_allclose(got["sites"][site]["dice"], block["dice"], rtol=1e-6)
    np.testing.assert_allclose(got["unseen"]["dice_thresh_avg"], final["unseen"]["dice_thresh_avg"], rtol=1e-6)


# The trained tiny model is prompt-free: prompts are tested on a prompted model in tests/predict.
@pytest.mark.parametrize("kind", ["png", "npy", "nii.gz"])
def test_predict_formats(tiny_run, tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "png":
        from PIL import Image
        src = tmp_path / "in.png"
        Image.fromarray((rng.random((48, 60)) * 255).astype(np.uint8)).save(src)
        out, shape = tmp_path / "out.png", (48, 60)
    elif kind == "npy":
        src = tmp_path / "in.npy"
        np.save(src, rng.random((52, 44, 3)).astype(np.float32))
        out, shape = tmp_path / "out.npy", (52, 44)
    else:
        import nibabel as nib
        src = tmp_path / "in.nii.gz"
        nib.save(nib.Nifti1Image((rng.random((40, 36, 3)) * 900).astype(np.int16), np.diag([2, 2, 3, 1])), src)
        out, shape = tmp_path / "out.nii.gz", (40, 36, 3)
    logits = tmp_path / "logits.npy"
    assert predict.main(["--weights", str(tiny_run), "--input", str(src), "--out", str(out),
                         "--save-logits", str(logits)]) == 0
    if kind == "png":
        from PIL import Image
        mask = np.asarray(Image.open(out))
    elif kind == "npy":
        mask = np.load(out)
    else:
        import nibabel as nib
        img = nib.load(out)
        mask = np.asarray(img.dataobj)
        np.testing.assert_array_equal(img.affine, np.diag([2, 2, 3, 1]))
    assert mask.shape == shape and set(np.unique(mask)) <= {0, 1, 255}
    raw = np.load(logits)
    assert raw.shape[-3:] == (16, 16, 1)  # low-res logits of the 64 px tiny model
    # The written mask is the upsampled raw logits thresholded at 0.
    first = raw if raw.ndim == 3 else raw[0]
    if kind == "nii.gz":  # slice 0 is laid out [Y, X] for the model; the volume is [X, Y, Z]
        ref = predict.logits_to_mask(first[None], shape[1], shape[0])[0].T
    else:
        ref = predict.logits_to_mask(first[None], *shape[:2])[0]
    got = mask if mask.ndim == 2 else mask[..., 0]
    np.testing.assert_array_equal(got > 0, ref > 0)
