"""The README's path as a user walks it, on fake files in the release layouts:
convert an original FedFMS checkpoint (no numerics flags), train a paper config from it on
the prostate release layout, predict a NIfTI volume from the work dir, export back to
PyTorch and convert again. Every step is the command line, run from a user's folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.data import fake_raw
from tests.weights_convert._states import random_state, save_torch

REPO = Path(__file__).resolve().parents[1]
SITES = ["BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL"]
pytestmark = pytest.mark.slow


def _run(cwd: Path, module: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, f"{module} {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _prostate_release(root: Path) -> None:
    """Two T2 volumes per site in the SAML release layout (HK in the images/labels layout)."""
    rng = np.random.default_rng(0)
    for site in SITES:
        for c in range(2):
            vol, lab = fake_raw.blob_volume(rng, (24, 20, 4), fg_slices=[1, 2])
            if site == "HK":
                fake_raw.nifti(root / site / "images" / f"Case{c:02d}.nii.gz", vol)
                fake_raw.nifti(root / site / "labels" / f"Case{c:02d}.nii.gz", lab)
            else:
                fake_raw.nifti(root / site / f"Case{c:02d}.nii.gz", vol)
                fake_raw.nifti(root / site / f"Case{c:02d}_segmentation.nii.gz", lab)


def _fedfms_checkpoint(path: Path) -> None:
    """An original FedFMS state dict (small ViT, MSA adapters, 1 class), as its code saves it:
    the unused one-class seg1 head included."""
    from fedfms_jax.models.sam import SamConfig
    state = random_state(SamConfig(encoder="vit_tiny", image_size=64, adapters=True, prompt_free=True,
                                   pixel_norm="unit", pad_before_norm1=True), seed=1)
    rng = np.random.default_rng(2)
    state["mask_decoder.seg1.weight"] = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    state["mask_decoder.seg1.bias"] = rng.standard_normal(1).astype(np.float32)
    save_torch(state, path)


def test_convert_train_predict_export_as_the_readme_says(tmp_path):
    user = tmp_path / "user"  # the user's folder: no checkout, only their files
    user.mkdir()
    _prostate_release(user / "prostate")
    _fedfms_checkpoint(user / "fedfms.pth")

    out = _run(user, "weights_convert", "convert", "--checkpoint", "fedfms.pth", "--out", "weights/fedfms")
    assert "detected: FedFMS" in out and "pad_before_norm1=on" in out and "prompt_free=on" in out
    assert json.loads((user / "weights/fedfms/model.json").read_text())["config"]["pad_before_norm1"] is True

    # A paper config by name, from the converted weights, shrunk to seconds by overrides.
    _run(user, "fedfms_jax.train", "--config", "prostate:method=fedmsa,unseen=5", "--workdir", "runs/p",
         "--config.init_from=weights/fedfms", "--config.manual_dir=prostate", "--config.data_dir=tfds",
         "--config.image_size=64", "--config.model.encoder=vit_tiny", "--config.rounds=1",
         "--config.local_steps=1", "--config.batch_size=2", "--config.eval_batch_size=4",
         "--config.max_eval_images=4", "--config.num_overlays=1")
    results = json.loads((user / "runs/p/results.json").read_text())
    assert results["unseen_site"] == "UCL" and set(results["final"]["sites"]) == set(SITES[:5])
    final = json.loads((user / "runs/p/final/model.json").read_text())
    assert final["config"]["pad_before_norm1"] is True and final["config"]["prompt_free"] is True
    assert final["slice_orientation"] == "xy"  # the paper protocol slices prostate [X, Y]

    # The dataset cache can go: the trained model stands alone.
    import shutil
    shutil.rmtree(user / "tfds")
    volume = user / "prostate" / "UCL" / "Case00.nii.gz"
    _run(user, "fedfms_jax.predict", "--weights", "runs/p", "--input", str(volume), "--out", "ucl.nii.gz",
         "--save-logits", "ucl_logits.npy")
    mask, src = nib.load(user / "ucl.nii.gz"), nib.load(volume)
    assert mask.shape == src.shape and np.array_equal(mask.affine, src.affine)
    assert (user / "ucl_overlay.png").is_file()

    # Back to PyTorch and in again: the same model, the same logits.
    _run(user, "weights_convert", "export", "--weights", "runs/p", "--out", "trained.pth")
    out = _run(user, "weights_convert", "convert", "--checkpoint", "trained.pth", "--out", "weights/back")
    assert "detected: FedFMS" in out
    _run(user, "fedfms_jax.predict", "--weights", "weights/back", "--input", str(volume), "--out", "back.nii.gz",
         "--save-logits", "back_logits.npy")
    np.testing.assert_allclose(np.load(user / "back_logits.npy"), np.load(user / "ucl_logits.npy"),
                               rtol=0, atol=1e-5)
