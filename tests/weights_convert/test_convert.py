"""convert / export / store on a small ViT SAM: values, strictness, resizing, adapters,
FedFMS settings. Checkpoints are random state dicts in PyTorch layout, saved by torch."""
import json

import numpy as np
import pytest

from tests.weights_convert._states import random_state, save_torch, torch_shapes
from weights_convert import rules
from weights_convert.__main__ import main
from weights_convert.convert import NON_PERSISTENT
from weights_convert.store import load_model, model_variables, path_name, save_weights

import torch  # noqa: E402
SIZE = 160  # vit_tiny: a 10x10 token grid, windows of 4, global blocks 1 and 3


def _config(**kw):
    from fedfms_jax.models.sam import SamConfig

    return SamConfig(**{"encoder": "vit_tiny", "image_size": SIZE, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    state = random_state(_config(), seed=0)
    save_torch(state, root / "tiny.pth")
    return root / "tiny.pth", state


def _flax_values(model) -> dict[str, np.ndarray]:
    return {path_name(p): np.asarray(v.get_value()) for p, v in model_variables(model)}


def test_convert_fills_every_variable_exactly(tiny, tmp_path, capsys):
    ckpt, state = tiny
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert f"{len(state)} keys" in capsys.readouterr().out
    meta = json.loads((out / "model.json").read_text())
    assert (meta["variant"], meta["image_size"], meta["adapters"], meta["prompt_free"],
            meta["num_classes"], meta["pixel_norm"]) == ("vit_tiny", SIZE, False, False, 1, "sam")
    assert meta["slice_orientation"] == "yx"
    cfg, model = load_model(out)
    assert (cfg.encoder, cfg.image_size) == ("vit_tiny", SIZE)
    variables = model_variables(model)
    keys = {rules.torch_key(p) for p, _ in variables}
    assert set(state) <= keys and keys - set(state) <= set(NON_PERSISTENT)
    for path, var in variables:
        key = rules.torch_key(path)
        if key in NON_PERSISTENT:
            continue
        np.testing.assert_array_equal(np.asarray(var.get_value()), rules.to_flax(path, state[key]), err_msg=key)


@pytest.mark.parametrize("writer", ["native", "torch"])
def test_export_gives_back_the_same_tensors(tiny, tmp_path, writer):
    ckpt, state = tiny
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    back = tmp_path / "back.pth"
    assert main(["export", "--weights", str(out), "--out", str(back), "--writer", writer]) == 0
    loaded = torch.load(back, weights_only=True)
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == torch.float32
        np.testing.assert_array_equal(loaded[k].numpy(), v, err_msg=k)


def test_mismatch_lists_every_key_and_writes_nothing(tiny, tmp_path, capsys):
    _, state = tiny
    bad = dict(state)
    missing = "mask_decoder.iou_token.weight"
    del bad[missing]
    bad["image_encoder.extra.weight"] = np.zeros(3, np.float32)
    misshaped = "image_encoder.neck.0.weight"
    bad[misshaped] = np.zeros((1, 1, 1, 1), np.float32)
    ckpt = tmp_path / "bad.pth"
    save_torch(bad, ckpt)
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing (1)" in err and missing in err
    assert "unexpected (1)" in err and "image_encoder.extra.weight" in err
    assert "mis-shaped (1)" in err and misshaped in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w")]  # no temp dir left


def test_persistent_pixel_statistics_are_carried_through(tiny, tmp_path):
    """Some SAM forks save pixel_mean/pixel_std in the state dict: used, and given back."""
    _, state = tiny
    extra = dict(state, pixel_mean=np.array([123.675, 116.28, 103.53], np.float32).reshape(3, 1, 1),
                 pixel_std=np.array([58.395, 57.12, 57.375], np.float32).reshape(3, 1, 1))
    ckpt = tmp_path / "fork.pth"
    save_torch(extra, ckpt)
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    back = tmp_path / "back.pth"
    assert main(["export", "--weights", str(out), "--out", str(back), "--writer", "native"]) == 0
    loaded = torch.load(back, weights_only=True)
    assert set(loaded) == set(extra)
    for k, v in extra.items():
        np.testing.assert_array_equal(loaded[k].numpy(), v, err_msg=k)


def test_output_dir_is_not_overwritten_without_force(tiny, tmp_path, capsys):
    ckpt, _ = tiny
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.json").exists()
    back = tmp_path / "b.pth"
    back.write_bytes(b"old")
    assert main(["export", "--weights", str(out), "--out", str(back)]) == 2
    assert back.read_bytes() == b"old"


def test_resize_to_another_input_size(tiny, tmp_path):
    from fedfms_jax.models.image_encoder import VIT_CONFIGS, resize_pos_embed, resize_rel_pos

    ckpt, state = tiny
    out = tmp_path / "w"
    new = 224  # grid 10 -> 14
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out), "--image-size", str(new)]) == 0
    cfg, model = load_model(out)
    assert cfg.image_size == new
    got = _flax_values(model)
    np.testing.assert_allclose(got["image_encoder/pos_embed"],
                               resize_pos_embed(state["image_encoder.pos_embed"], (14, 14)), rtol=0, atol=0)
    vit = VIT_CONFIGS["vit_tiny"]
    g = vit.global_attn_indexes[0]
    rel = state[f"image_encoder.blocks.{g}.attn.rel_pos_h"]
    assert rel.shape[0] == 2 * 10 - 1
    np.testing.assert_array_equal(got[f"image_encoder/blocks/{g}/attn/rel_pos_h"], resize_rel_pos(rel, 2 * 14 - 1))
    w = next(i for i in range(vit.depth) if i not in vit.global_attn_indexes)
    np.testing.assert_array_equal(got[f"image_encoder/blocks/{w}/attn/rel_pos_w"],
                                  state[f"image_encoder.blocks.{w}.attn.rel_pos_w"])  # windows keep their size
    assert got["image_encoder/pos_embed"].shape == (1, 14, 14, vit.embed_dim)


@pytest.mark.slow
def test_add_adapters_then_round_trip(tiny, tmp_path):
    ckpt, state = tiny
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out), "--adapters"]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["adapters"] is True and meta["added_adapters"] is True
    cfg, model = load_model(out)
    values = _flax_values(model)
    adapter = [k for k in values if "_Adapter" in k]
    base = [k for k in values if "_Adapter" not in k and k not in NON_PERSISTENT]
    assert adapter and len(base) == len(state)
    assert any(np.abs(values[k]).sum() > 0 for k in adapter if k.endswith("kernel"))  # initialised, not zeros
    for path, _ in model_variables(model):
        key = rules.torch_key(path)
        if key in state:
            np.testing.assert_array_equal(values[path_name(path)], rules.to_flax(path, state[key]))
    # The adapted checkpoint exports, is detected as adapted, and converts back unchanged.
    back = tmp_path / "adapted.pth"
    assert main(["export", "--weights", str(out), "--out", str(back)]) == 0
    again = tmp_path / "w2"
    assert main(["convert", "--checkpoint", str(back), "--out", str(again)]) == 0
    assert json.loads((again / "model.json").read_text())["added_adapters"] is False
    _, model2 = load_model(again)
    for k, v in _flax_values(model2).items():
        np.testing.assert_array_equal(v, values[k], err_msg=k)


def test_fedfms_settings_land_in_model_json(tmp_path):
    state = random_state(_config(num_classes=2), seed=1)
    assert state["mask_decoder.seg1.weight"].shape[0] == 2
    ckpt = tmp_path / "fedfms.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "epoch": 99}, ckpt)  # training wrapper
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out), "--prompt-free",
                 "--pixel-norm", "unit"]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert (meta["prompt_free"], meta["pixel_norm"], meta["num_classes"]) == (True, "unit", 2)
    cfg, _ = load_model(out)
    assert (cfg.prompt_free, cfg.pixel_norm, cfg.num_classes) == (True, "unit", 2)


def test_save_weights_after_training_and_safetensors_input(tiny, tmp_path):
    from safetensors.numpy import save_file

    ckpt, state = tiny
    st = tmp_path / "tiny.safetensors"
    save_file(state, st)
    out = tmp_path / "w"
    assert main(["convert", "--checkpoint", str(st), "--out", str(out)]) == 0
    cfg, model = load_model(out)
    before = _flax_values(model)
    saved = save_weights(tmp_path / "trained", model, cfg)
    cfg2, model2 = load_model(saved)
    assert cfg2 == cfg
    for k, v in _flax_values(model2).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    with pytest.raises(ValueError, match="not empty"):
        save_weights(saved, model, cfg)


def test_cli_usage_errors(tiny, tmp_path, capsys):
    ckpt, _ = tiny
    assert main(["convert", "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--variant", "vit_b"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["export", "--weights", str(tmp_path), "--out", str(tmp_path / "x.pth")]) == 2
    assert "model.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["convert", "--checkpoint", str(ckpt)])
    assert e.value.code == 2
    assert main(["inspect", str(ckpt)]) == 0
    assert "vit_tiny" in capsys.readouterr().out
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(tmp_path / "w")]) == 0
    assert main(["inspect", str(tmp_path / "w")]) == 0
    assert '"variant": "vit_tiny"' in capsys.readouterr().out
    assert len(torch_shapes(_config())) > 0
