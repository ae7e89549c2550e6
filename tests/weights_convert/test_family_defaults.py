"""convert picks each checkpoint family's own numerics, says so in one line and in
model.json, and every choice yields to a flag. Small random checkpoints of each family's
layout, saved by torch."""
import json
import types

import numpy as np
import pytest
import torch

from tests.weights_convert._sam_import import import_segment_anything
from tests.weights_convert._states import random_state, save_torch
from weights_convert.__main__ import main
from weights_convert.detect import detect, family_of
from weights_convert.store import load_model

ON_OFF = {True: "on", False: "off"}
# The original FedFMS decoder always holds seg1; with one class it is (1, 4, 1, 1) and unused.
ONE_CLASS_SEG1 = {"mask_decoder.seg1.weight": (1, 4, 1, 1), "mask_decoder.seg1.bias": (1,)}

# name: (SamConfig of the checkpoint's layout, extra keys, family, evidence, numerics)
FAMILIES = {
    "fedfms": (dict(encoder="vit_tiny", image_size=160, adapters=True, num_classes=2), {}, "FedFMS",
               "ViT (test size) with MSA adapters, seg1 head, 2 classes, 160 px", (True, True, "unit")),
    "fedfms_one_class": (dict(encoder="vit_tiny", image_size=160, adapters=True), ONE_CLASS_SEG1, "FedFMS",
                         "ViT (test size) with MSA adapters, seg1 head, 1 class, 160 px", (True, True, "unit")),
    "msa": (dict(encoder="vit_tiny", image_size=160, adapters=True), {}, "MSA",
            "ViT (test size) with MSA adapters, 160 px", (True, False, "sam")),
    "sam": (dict(encoder="vit_tiny", image_size=160), {}, "SAM", "ViT (test size), 160 px", (False, False, "sam")),
    "lite_medsam": (dict(encoder="tiny_vit", tiny_vit="lite_medsam", image_size=256), {}, "LiteMedSAM",
                    "TinyViT with 1x1 patch convs, 256 px", (False, False, "unit")),
    "mobile_sam": (dict(encoder="tiny_vit", tiny_vit="mobile_sam", image_size=1024), {}, "MobileSAM or TinySAM",
                   "TinyViT-5M, 1024 px", (False, False, "sam")),
}


def _checkpoint(name: str, root) -> str:
    from fedfms_jax.models.sam import SamConfig

    kw, extra, *_ = FAMILIES[name]
    state = random_state(SamConfig(**kw), seed=7)
    rng = np.random.default_rng(8)
    state.update({k: rng.standard_normal(shape).astype(np.float32) for k, shape in extra.items()})
    path = root / f"{name}.pth"
    save_torch(state, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: _checkpoint(name, root) for name in FAMILIES}


def _numerics(cfg) -> tuple:
    return cfg.pad_before_norm1, cfg.prompt_free, cfg.pixel_norm


def _expected_line(family: str, evidence: str, numerics: tuple, vit: bool, flagged: dict | None = None) -> str:
    pad, prompt_free, pixel_norm = numerics
    shown = {"pad_before_norm1": ON_OFF[pad] if vit else "n/a", "prompt_free": ON_OFF[prompt_free],
             "pixel_norm": pixel_norm}
    for key, text in (flagged or {}).items():
        shown[key] = text
    return f"detected: {family} ({evidence}) -> " + ", ".join(f"{k}={v}" for k, v in shown.items())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_detected_settings_in_the_line_and_model_json(name, checkpoints, tmp_path, capsys):
    kw, _, family, evidence, numerics = FAMILIES[name]
    vit = kw["encoder"] != "tiny_vit"
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", checkpoints[name], "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln for ln in lines if ln.startswith("detected:")] == [_expected_line(family, evidence, numerics, vit)]
    meta = json.loads((out / "model.json").read_text())
    assert meta["detected"]["family"] == family and meta["detected"]["evidence"] == evidence
    assert meta["detected"]["overridden"] == []
    config = meta["config"]
    assert (config["pad_before_norm1"], config["prompt_free"], config["pixel_norm"]) == numerics
    assert (meta["prompt_free"], meta["pixel_norm"]) == numerics[1:]
    cfg, _ = load_model(out)
    assert _numerics(cfg) == numerics
    assert main(["inspect", checkpoints[name]]) == 0
    assert _expected_line(family, evidence, numerics, vit) in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("variant,family,encoder", [
    ("vit_b", "SAM or MedSAM", "ViT-B"), ("vit_l", "SAM", "ViT-L"), ("vit_h", "SAM", "ViT-H")])
def test_official_sam_sizes(variant, family, encoder):
    """Official architectures on torch's meta device: real keys and shapes, no memory.
    MedSAM is a ViT-B with official SAM's keys: only the name admits it."""
    import_segment_anything()
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        sam = sam_model_registry[variant]()
    shapes = {k: types.SimpleNamespace(shape=tuple(v.shape)) for k, v in sam.state_dict().items()}
    assert family_of(detect(shapes)).describe() == (
        f"detected: {family} ({encoder}, 1024 px) -> pad_before_norm1=off, prompt_free=off, pixel_norm=sam")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_choice_yields_to_a_flag(name, checkpoints, tmp_path, capsys):
    kw, _, family, evidence, (pad, prompt_free, pixel_norm) = FAMILIES[name]
    vit = kw["encoder"] != "tiny_vit"
    other_norm = "sam" if pixel_norm == "unit" else "unit"
    flags = ["--prompt-free" if not prompt_free else "--no-prompt-free", "--pixel-norm", other_norm]
    flagged = {"prompt_free": f"{ON_OFF[not prompt_free]} (flag; detected {ON_OFF[prompt_free]})",
               "pixel_norm": f"{other_norm} (flag; detected {pixel_norm})"}
    if vit:
        flags.append("--pad-before-norm1" if not pad else "--no-pad-before-norm1")
        flagged["pad_before_norm1"] = f"{ON_OFF[not pad]} (flag; detected {ON_OFF[pad]})"
    want = (not pad if vit else pad, not prompt_free, other_norm)
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", checkpoints[name], "--out", str(out), *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln for ln in lines if ln.startswith("detected:")] == [
        _expected_line(family, evidence, (pad, prompt_free, pixel_norm), vit, flagged)]
    meta = json.loads((out / "model.json").read_text())
    config = meta["config"]
    assert (config["pad_before_norm1"], config["prompt_free"], config["pixel_norm"]) == want
    assert sorted(meta["detected"]["overridden"]) == sorted(flagged)
    assert _numerics(load_model(out)[0]) == want


def test_a_flag_that_agrees_with_detection_is_no_override(checkpoints, tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", checkpoints["fedfms"], "--out", str(out), "--prompt-free",
                 "--pixel-norm", "unit", "--pad-before-norm1"]) == 0
    assert "(flag;" not in capsys.readouterr().out
    assert json.loads((out / "model.json").read_text())["detected"]["overridden"] == []


def test_padding_order_is_refused_for_tiny_vit(checkpoints, tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", checkpoints["lite_medsam"], "--out", str(out),
                 "--pad-before-norm1"]) == 2
    err = capsys.readouterr().err
    assert "pad_before_norm1 applies to ViT encoders only" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_training_from_converted_weights_keeps_their_padding_order(checkpoints, tmp_path):
    from fedfms_jax.model_init import build_model

    for name, pad in (("fedfms", True), ("sam", False)):
        out = tmp_path / name
        assert main(["convert", "--checkpoint", checkpoints[name], "--out", str(out)]) == 0
        kw = FAMILIES[name][0]
        from fedfms_jax.run_config import base_config
        cfg = base_config()  # a training config of today's defaults (clean numerics)
        cfg.image_size, cfg.num_classes, cfg.init_from = kw["image_size"], kw.get("num_classes", 1), str(out)
        cfg.model.encoder = "vit_tiny"
        scfg, model, _ = build_model(cfg)
        assert scfg.pad_before_norm1 is pad
        assert all(block.pad_before_norm1 is pad for block in model.image_encoder.blocks)
