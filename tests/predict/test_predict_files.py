"""predict on files as a clinic has them: NIfTI volumes sliced as the model was trained,
reoriented like a viewer, written back in the file's own orientation; folders; prompts."""
import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from fedfms_jax import predict
from fedfms_jax.cli_errors import UsageError
from fedfms_jax.data import preprocess
from fedfms_jax.models.sam import SamConfig, build_sam
from weights_convert.store import save_weights

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny model saved three ways: with prompts ([Y,X] slices), prompt-free [Y,X] and
    prompt-free [X,Y] (the parameters are the same; only model.json differs)."""
    root = tmp_path_factory.mktemp("models")
    cfg = SamConfig(encoder="vit_tiny", image_size=64)
    model = build_sam(cfg, rngs=nnx.Rngs(3))
    free = dataclasses.replace(cfg, prompt_free=True)
    dirs = {"prompted": save_weights(root / "prompted", model, cfg),
            "yx": save_weights(root / "yx", model, free),
            "xy": save_weights(root / "xy", model, free, meta={"slice_orientation": "xy"})}
    return dirs


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    return (rng.random((40, 36, 3)) * 900).astype(np.int16)  # [X, Y, Z], non-square slices


def _predict(weights, src, out, *extra):
    logits = out.with_name(out.name.split(".")[0] + "_logits.npy")
    assert predict.main(["--weights", str(weights), "--input", str(src), "--out", str(out),
                         "--save-logits", str(logits), *extra]) == 0
    return np.load(logits)


def test_nifti_equals_its_slices_given_in_training_orientation(models, volume, tmp_path):
    nii = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), nii)
    stack = tmp_path / "stack.npy"  # the slices as the prostate builder feeds them to training
    np.save(stack, preprocess.axial_slices(preprocess.clip_scale(volume.astype(np.float32)), "yx"))
    from_nii = _predict(models["yx"], nii, tmp_path / "a.nii.gz")
    from_npy = _predict(models["yx"], stack, tmp_path / "b.npy")
    np.testing.assert_allclose(from_nii, from_npy, rtol=0, atol=1e-6)
    written = np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj)
    assert written.shape == volume.shape
    np.testing.assert_array_equal(written, preprocess.volume_of_slices(np.load(tmp_path / "b.npy"), "yx"))
    assert (tmp_path / "a_overlay.png").is_file() and (tmp_path / "b_overlay.png").is_file()


def test_non_canonical_affine_gives_the_same_result_after_reorientation(models, volume, tmp_path):
    canonical, flipped = tmp_path / "c.nii.gz", tmp_path / "f.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), canonical)
    # The same anatomy stored with X running right-to-left: voxel i holds what was at 39 - i.
    flip = AFFINE @ np.array([[-1, 0, 0, 39], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(volume[::-1].copy(), flip), flipped)
    a = _predict(models["yx"], canonical, tmp_path / "c_out.nii.gz")
    b = _predict(models["yx"], flipped, tmp_path / "f_out.nii.gz")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    out_c, out_f = nib.load(tmp_path / "c_out.nii.gz"), nib.load(tmp_path / "f_out.nii.gz")
    np.testing.assert_array_equal(out_f.affine, flip)  # written back in the file's own orientation
    np.testing.assert_array_equal(np.asarray(out_f.dataobj), np.asarray(out_c.dataobj)[::-1])


def test_each_model_gets_the_slice_layout_it_was_trained_with(models, volume, tmp_path):
    nii = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), nii)
    assert json.loads((models["xy"] / "model.json").read_text())["slice_orientation"] == "xy"
    yx = _predict(models["yx"], nii, tmp_path / "yx.nii.gz")
    xy = _predict(models["xy"], nii, tmp_path / "xy.nii.gz")
    assert not np.allclose(yx, xy, atol=1e-3)  # the two layouts are different inputs
    stack = tmp_path / "xy_stack.npy"
    np.save(stack, preprocess.axial_slices(preprocess.clip_scale(volume.astype(np.float32)), "xy"))
    np.testing.assert_allclose(xy, _predict(models["xy"], stack, tmp_path / "xy.npy"), rtol=0, atol=1e-6)
    # Either way the label volume comes back as [X, Y, Z].
    assert np.asarray(nib.load(tmp_path / "xy.nii.gz").dataobj).shape == volume.shape


def test_prompts_steer_a_prompted_model_and_are_refused_by_a_prompt_free_one(models, tmp_path):
    from PIL import Image
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(1).random((48, 60)) * 255).astype(np.uint8)).save(src)
    plain = _predict(models["prompted"], src, tmp_path / "p0.png")
    boxed = _predict(models["prompted"], src, tmp_path / "p1.png", "--box", "2,3,40,30")
    pointed = _predict(models["prompted"], src, tmp_path / "p2.png", "--point", "10,12")
    assert not np.allclose(plain, boxed, atol=1e-4) and not np.allclose(boxed, pointed, atol=1e-4)
    with pytest.raises(UsageError, match="prompt-free"):
        predict.main(["--weights", str(models["yx"]), "--input", str(src), "--out", str(tmp_path / "x.png"),
                      "--box", "2,3,40,30"])
    assert not (tmp_path / "x.png").exists()


def test_a_folder_is_segmented_file_by_file_and_nothing_is_overwritten(models, volume, tmp_path):
    from PIL import Image
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray((rng.random((30, 50)) * 255).astype(np.uint8)).save(src / "a.jpg")
    np.save(src / "b.npy", rng.random((20, 24, 3)).astype(np.float32))
    nib.save(nib.Nifti1Image(volume, AFFINE), src / "c.nii.gz")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert predict.main(["--weights", str(models["yx"]), "--input", str(src), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["a.png", "a_overlay.png", "b.npy", "b_overlay.png", "c.nii.gz", "c_overlay.png"])
    assert np.asarray(Image.open(out / "a.png")).shape == (30, 50)
    assert np.load(out / "b.npy").shape == (20, 24)
    assert nib.load(out / "c.nii.gz").shape == volume.shape
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(UsageError, match="exist already"):
        predict.main(["--weights", str(models["yx"]), "--input", str(src), "--out", str(out)])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
