"""A trained run's final/ is a portable model: predict and export read it (or a round's
checkpoint over it) without any dataset, and it goes through PyTorch and back unchanged."""
import json

import numpy as np
import pytest

from fedfms_jax import predict
from tests.train.conftest import TINY, TINY_RUN_GROUP
from weights_convert.__main__ import main as weights_convert_main

pytestmark = [pytest.mark.slow, TINY_RUN_GROUP]


@pytest.fixture
def no_dataset(monkeypatch, tmp_path):
    """Any attempt to build a federation fails the test; the asset cache is empty."""
    from fedfms_jax import run_state
    from fedfms_jax.data import federations

    def refuse(*args, **kwargs):
        raise AssertionError("a dataset was built to load a model")

    monkeypatch.setattr(federations, "get_federation", refuse)
    monkeypatch.setattr(run_state, "load_federation", refuse)
    monkeypatch.setenv("FEDFMS_CACHE", str(tmp_path / "empty_cache"))


def _predict_logits(weights, tmp_path, tag, extra=()):
    src = tmp_path / "in.npy"
    if not src.exists():
        np.save(src, (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8))
    logits = tmp_path / f"{tag}_logits.npy"
    assert predict.main(["--weights", str(weights), "--input", str(src), "--out", str(tmp_path / f"{tag}.npy"),
                         "--save-logits", str(logits), *extra]) == 0
    return np.load(logits)


def test_final_dir_is_a_weights_convert_directory(tiny_run):
    cfg = json.loads((tiny_run / "config.json").read_text())
    doc = json.loads((tiny_run / "final" / "model.json").read_text())
    assert doc["format"] == "fedfms_jax.weights" and doc["layout"] == "flax_nnx"
    assert (doc["variant"], doc["image_size"], doc["num_classes"]) == ("vit_tiny", 64, 1)
    assert (doc["pixel_norm"], doc["prompt_free"], doc["adapters"]) == (
        cfg["model"]["pixel_norm"], cfg["model"]["prompt_free"], cfg["model"]["adapters"])
    assert doc["config"]["encoder"] == "vit_tiny" and doc["trained"]["round"] == cfg["rounds"] == 2
    assert (tiny_run / "final" / "params.safetensors").is_file()


def test_predict_and_export_without_dataset_then_convert_back(tiny_run, tmp_path, no_dataset, capsys):
    from_final = _predict_logits(tiny_run / "final", tmp_path, "final")
    from_workdir = _predict_logits(tiny_run, tmp_path, "workdir")
    np.testing.assert_array_equal(from_workdir, from_final)

    pth = tmp_path / "trained.pth"
    assert weights_convert_main(["export", "--weights", str(tiny_run), "--out", str(pth),
                                 "--writer", "native"]) == 0, capsys.readouterr().err
    back = tmp_path / "converted"
    doc = json.loads((tiny_run / "final" / "model.json").read_text())
    # The model's numerics, stated: detection would pick the family's own.
    flags = ["--prompt-free" if doc["prompt_free"] else "--no-prompt-free",
             "--pad-before-norm1" if doc["config"]["pad_before_norm1"] else "--no-pad-before-norm1"]
    assert weights_convert_main(["convert", "--checkpoint", str(pth), "--out", str(back),
                                 "--pixel-norm", doc["pixel_norm"], *flags]) == 0, capsys.readouterr().err
    converted = _predict_logits(back, tmp_path, "converted")
    np.testing.assert_allclose(converted, from_final, rtol=1e-6, atol=1e-6)


def test_round_is_materialised_from_its_checkpoint_without_dataset(tiny_run, tmp_path, no_dataset):
    from weights_convert.convert import exported_state_dict
    final = exported_state_dict(tiny_run / "final")
    last = exported_state_dict(tiny_run, 2)
    first = exported_state_dict(tiny_run, 1)
    assert set(final) == set(last) == set(first)
    for key in final:
        np.testing.assert_array_equal(last[key], final[key], err_msg=key)
    assert any(not np.array_equal(first[k], final[k]) for k in final)  # round 1 is another model
    round1 = _predict_logits(tiny_run, tmp_path, "round1", ["--round", "1"])
    assert not np.array_equal(round1, _predict_logits(tiny_run, tmp_path, "final"))


def test_missing_round_is_one_line_exit_2(tiny_run, tmp_path, capsys):
    from fedfms_jax.cli_errors import run_cli
    src = tmp_path / "in.npy"
    np.save(src, np.zeros((8, 8), np.uint8))
    code = run_cli(predict.main, ["--weights", str(tiny_run), "--round", "7", "--input", str(src),
                                  "--out", str(tmp_path / "o.npy")], "predict")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "round 7" in err, err
    assert not (tmp_path / "o.npy").exists()


def _count_builds(monkeypatch):
    from fedfms_jax.models import sam
    from weights_convert import store
    calls = {"build_sam": 0, "abstract": 0}
    real_build, real_abstract = sam.build_sam, store.abstract_model

    def build(*args, **kwargs):
        calls["build_sam"] += 1
        return real_build(*args, **kwargs)

    def abstract(*args, **kwargs):
        calls["abstract"] += 1
        return real_abstract(*args, **kwargs)

    monkeypatch.setattr(sam, "build_sam", build)
    monkeypatch.setattr(store, "abstract_model", abstract)
    return calls


def test_weights_dir_builds_the_model_once_with_shapes_only(tiny_run, monkeypatch):
    from fedfms_jax import model_init
    from fedfms_jax.train import parse_config
    from weights_convert.store import model_variables, path_name, read_params
    cfg, _ = parse_config([*TINY, f"--config.init_from={tiny_run / 'final'}"])
    calls = _count_builds(monkeypatch)
    _, model, info = model_init.build_model(cfg)
    assert calls == {"build_sam": 1, "abstract": 1} and info["kept_init"] == 0
    stored = read_params(tiny_run / "final")
    for path, var in model_variables(model):
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(stored[path_name(path)]))


def test_weights_without_adapters_build_once_for_real(tmp_path, monkeypatch):
    """Adapters absent from the weights keep the model's init: one real build, no shape-only one."""
    from flax import nnx
    from fedfms_jax import model_init
    from fedfms_jax.models.sam import build_sam
    from fedfms_jax.train import parse_config
    from weights_convert.store import model_variables, path_name, read_params, save_weights
    cfg, _ = parse_config(TINY)
    plain, _ = parse_config(TINY)
    plain["model"]["adapters"] = False
    scfg = model_init.sam_config(plain)
    weights = save_weights(tmp_path / "no_adapters", build_sam(scfg, rngs=nnx.Rngs(5)), scfg)
    cfg["init_from"] = str(weights)
    calls = _count_builds(monkeypatch)
    _, model, info = model_init.build_model(cfg)
    assert calls == {"build_sam": 1, "abstract": 0}
    stored = read_params(weights)
    kept = [path_name(p) for p, _ in model_variables(model) if path_name(p) not in stored]
    assert info["kept_init"] == len(kept) > 0 and all("_Adapter/" in k for k in kept)
    for path, var in model_variables(model):
        if path_name(path) in stored:
            np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(stored[path_name(path)]))


def test_unfinished_run_rounds_come_from_init_from(tiny_run, tmp_path, no_dataset):
    """Without final/ (a run still training) a round is its init_from model with the round's
    trained leaves: the same model as final/'s frozen leaves with them."""
    import shutil
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_run, unfinished)
    shutil.rmtree(unfinished / "final")
    np.testing.assert_array_equal(_predict_logits(unfinished, tmp_path, "u1", ["--round", "1"]),
                                  _predict_logits(tiny_run, tmp_path, "f1", ["--round", "1"]))
    np.testing.assert_array_equal(_predict_logits(unfinished, tmp_path, "latest"),
                                  _predict_logits(tiny_run, tmp_path, "final"))
