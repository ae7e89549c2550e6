"""verify: PyTorch vs converted Flax outputs for small ViT SAMs (plain, and MSA-adapted
with a FedFMS two-class head), and its exit code."""
import pytest

from tests.weights_convert._states import random_state, save_torch
from weights_convert.__main__ import main
from weights_convert.verify import verify_checkpoint

import torch  # noqa: E402,F401  (torch is a test dependency: fail, never skip, without it)


def _config(**kw):
    from fedfms_jax.models.sam import SamConfig

    return SamConfig(encoder="vit_tiny", image_size=160, **kw)


@pytest.mark.slow
def test_verify_cli_small_vit(tmp_path, capsys):
    ckpt = tmp_path / "small.pth"
    save_torch(random_state(_config(), seed=3), ckpt)
    assert main(["verify", "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    errors = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "relative error" in line]
    assert len(errors) == 2 and all(0 < e < 1e-5 for e in errors), out


@pytest.mark.slow
def test_verify_msa_adapters_and_two_classes(tmp_path):
    ckpt = tmp_path / "msa.pth"
    save_torch(random_state(_config(adapters=True, num_classes=2), seed=4), ckpt)
    errors = verify_checkpoint(ckpt)
    assert set(errors) == {"image_embeddings", "mask_logits"}
    for name, err in errors.items():
        assert 0 <= err < 1e-5, (name, err)


def test_verify_exit_code_follows_the_tolerance(monkeypatch, tmp_path, capsys):
    import weights_convert.verify as verify

    monkeypatch.setattr(verify, "verify_checkpoint", lambda *a, **k: {"image_embeddings": 3e-6, "mask_logits": 2e-5})
    assert main(["verify", "--checkpoint", str(tmp_path / "x.pth")]) == 1
    assert "2.000e-05 is above 1e-05" in capsys.readouterr().err
    assert main(["verify", "--checkpoint", str(tmp_path / "x.pth"), "--tolerance", "1e-4"]) == 0
