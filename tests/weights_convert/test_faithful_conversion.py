"""The original FedFMS model, converted with no numerics flag, computes what PyTorch does.

The PyTorch side is fedfms_jax.reference (MSA blocks that pad windows before norm1, the
prompt-free decoder with `seg1`), fed images / 255 as the original trains. ViT-B at 256
input: its 16x16 token grid pads to 28x28 windows, so the padding order shows (about
8e-3 relative error when it is wrong). The Flax side is the path predict takes.
"""
import json

import numpy as np
import pytest
import torch

from fedfms_jax.predict import Predictor, load_predictor
from fedfms_jax.reference.torch_fedfms_decoder import build_torch_fedfms_sam, randomize_
from weights_convert.__main__ import main
from weights_convert.convert import exported_state_dict

SIZE = 256


def _rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _original_state(model, num_classes: int, seed: int) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if num_classes == 1:
        # The original decoder always builds seg1 (4 -> num_classes) and ignores it for one
        # class; the reference leaves it out, so add what the original's checkpoint holds.
        gen = torch.Generator().manual_seed(seed + 100)
        state["mask_decoder.seg1.weight"] = torch.randn(1, 4, 1, 1, generator=gen)
        state["mask_decoder.seg1.bias"] = torch.randn(1, generator=gen)
    return state


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [1, 2])
def test_original_fedfms_converts_faithfully_without_flags(num_classes, tmp_path, capsys):
    seed = 10 + num_classes
    torch_model = randomize_(build_torch_fedfms_sam("vit_b", SIZE, num_classes=num_classes, prompt_free=True,
                                                    adapters=True, pad_before_norm1=True), seed=seed)
    state = _original_state(torch_model, num_classes, seed)
    ckpt = tmp_path / "model.pth"
    torch.save(state, ckpt)

    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    classes = "1 class" if num_classes == 1 else "2 classes"
    line = (f"detected: FedFMS (ViT-B with MSA adapters, seg1 head, {classes}, 256 px) -> "
            "pad_before_norm1=on, prompt_free=on, pixel_norm=unit")
    assert line in capsys.readouterr().out.splitlines()
    meta = json.loads((out / "model.json").read_text())
    assert meta["detected"]["family"] == "FedFMS" and meta["detected"]["overridden"] == []
    assert meta["slice_orientation"] == "xy"  # the original trains on nibabel's [X, Y] slices
    assert (meta["config"]["pad_before_norm1"], meta["config"]["prompt_free"], meta["config"]["pixel_norm"],
            meta["config"]["num_classes"]) == (True, True, "unit", num_classes)

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
        expected = torch_model.predict(x)[0].permute(0, 2, 3, 1).numpy()

    model, size, pixel_norm, prompt_free = load_predictor(out)
    assert (size, pixel_norm, prompt_free) == (SIZE, "unit", True)
    got = Predictor(model, size, pixel_norm)(image)  # conftest: highest matmul precision
    assert got.shape == expected.shape == (1, SIZE // 4, SIZE // 4, num_classes)
    err = _rel_err(got, expected)
    assert err <= 1e-5, err

    # Everything in the checkpoint comes back on export, the unused one-class seg1 included.
    back = exported_state_dict(out)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
