"""Every config file loads in every variant; arguments and overrides are typed and checked;
configs are named by file or by name; --help; the paper configs' SAM weights."""
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import ml_collections
import pytest

from fedfms_jax import run_config, train, workdir as wd
from fedfms_jax.cli_errors import UsageError, run_cli
from fedfms_jax.train import parse_config
from tests.train.conftest import REPO, TINY

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FEDERATIONS = ["prostate", "fundus", "nuclei", "fets", "ctlung", "isic", "chaos"]


@pytest.fixture
def sam_weights_here(tmp_path, monkeypatch):
    """A working directory holding weights/sam_vit_b (a stand-in: only its model.json)."""
    (tmp_path / "weights" / "sam_vit_b").mkdir(parents=True)
    (tmp_path / "weights" / "sam_vit_b" / "model.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", FEDERATIONS)
@pytest.mark.parametrize("method", ["fedmsa", "fedsam"])
@pytest.mark.parametrize("mode", ["federated", "centralized", "local"])
def test_federation_variants(name, method, mode, sam_weights_here):
    cfg, workdir = parse_config(["--config", f"{CONFIGS / name}.py:method={method},mode={mode},unseen=1"])
    assert cfg["init_from"] == "weights/sam_vit_b"  # SAM ViT-B, never a random encoder by default
    assert cfg["federation"] == name and cfg["method"] == method and cfg["mode"] == mode
    assert cfg["unseen"] == 1 and cfg["model"]["adapters"] == (method == "fedmsa")
    assert cfg["lr"] == 1e-4 and cfg["pos_weight"] == 2.0 and cfg["image_size"] == 1024
    assert cfg["num_classes"] == (2 if name == "fundus" else 1)
    expected_batch = {"fedsam": 4 if name == "nuclei" else 6, "fedmsa": 8 if name == "fets" else 4}[method]  # the original's scripts
    assert cfg["batch_size"] == expected_batch
    assert workdir.name == cfg["name"]


def test_demo_is_the_default():
    cfg, workdir = parse_config([])
    assert cfg["federation"] == "nuclei_demo" and cfg["init_from"] == "lite_medsam"
    assert str(workdir) == str(Path("runs") / "demo")


def test_overrides_are_typed_and_tiny_keeps_them():
    cfg, _ = parse_config(["--config", f"{CONFIGS}/prostate.py:tiny=true", "--config.rounds=5",
                           "--config.lr=0.01", "--config.model.prompt_free=false", "--config.sites=('a','b')"])
    assert cfg["rounds"] == 5 and cfg["lr"] == 0.01 and cfg["model"]["prompt_free"] is False
    assert cfg["sites"] == ("a", "b")  # a ConfigDict keeps the field's tuple type
    assert cfg["image_size"] == 64 and cfg["federation"] == "synthetic"  # tiny applied
    cfg, _ = parse_config(["--config", f"{CONFIGS}/chaos.py", "--config.tiny=true"])
    assert cfg["model"]["encoder"] == "vit_tiny" and cfg["rounds"] == 2


@pytest.mark.parametrize("argv,needle", [
    (["--config.nope=1"], "unknown config field 'nope'"),
    (["--config.model.nope=1"], "unknown config field 'model.nope'"),
    (["--config.rounds=1.5"], "cannot parse"),
    (["--config.tiny=maybe"], "cannot parse"),
    (["--config", f"{CONFIGS}/prostate.py:method=fedxyz"], "method must be"),
    (["--config", f"{CONFIGS}/prostate.py:unsen=2"], "unknown config argument"),
    (["--config", f"{CONFIGS}/prostate.py", "--config.rounds=0"], "rounds must be"),
])
def test_rejected(argv, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        parse_config(argv)


def test_parse_config_args_types():
    out = run_config.parse_config_args("a=3,b=x,c=true", {"a": 0, "b": "", "c": False, "d": 1.5})
    assert out == {"a": 3, "b": "x", "c": True, "d": 1.5}


@pytest.mark.parametrize("loop, chunk", [("vmap", None), ("sequential", 1)])
def test_client_loop_selects_the_engines_client_chunk(loop, chunk):
    from fedfms_jax import model_init
    from fedfms_jax.run_state import make_engine
    cfg = parse_config([*TINY, f"--config.client_loop={loop}"])[0]
    engine = make_engine(cfg, model_init.build_model(cfg)[1])
    assert engine.client_chunk == chunk


def test_unknown_client_loop_is_refused():
    with pytest.raises(UsageError, match="client_loop must be vmap or sequential"):
        parse_config([*TINY, "--config.client_loop=threads"])  # validated with the config


# ------------------------------------------------------------------- one config schema
def test_configs_stay_configdicts():
    cfg, _ = parse_config(TINY)
    assert isinstance(cfg, ml_collections.ConfigDict) and isinstance(cfg["model"], ml_collections.ConfigDict)


def test_tiny_is_applied_once(monkeypatch):
    calls = []
    apply_tiny = run_config.apply_tiny
    monkeypatch.setattr(run_config, "apply_tiny", lambda c: (calls.append(1), apply_tiny(c)))
    for argv in (TINY, ["--config", f"{CONFIGS}/prostate.py:tiny=true"], ["--config", "demo:tiny=true"],
                 ["--config", "chaos", "--config.tiny=true"]):
        calls.clear()
        cfg, _ = parse_config(argv)
        assert calls == [1] and cfg["image_size"] == 64, argv
    calls.clear()
    parse_config(["--config", "synthetic"])
    assert calls == []


def test_config_files_do_not_shrink_themselves():
    for path in CONFIGS.glob("*.py"):
        assert "apply_tiny" not in path.read_text(), path.name


def test_every_command_validates_with_the_same_checks(tmp_path):
    """A work dir's config.json goes through run_config.validate when it is read back."""
    from fedfms_jax import run_state
    cfg, _ = parse_config(TINY)
    wd.create(tmp_path, cfg)
    doc = json.loads((tmp_path / wd.CONFIG_FILE).read_text())
    doc["image_size"] = 72
    (tmp_path / wd.CONFIG_FILE).write_text(json.dumps(doc))
    (tmp_path / wd.CKPT_DIR).mkdir()
    with pytest.raises(UsageError, match="not divisible"):
        run_state.restore_run(tmp_path)


def test_old_config_json_without_newer_fields_resumes(tmp_path):
    cfg, _ = parse_config(TINY)
    wd.create(tmp_path, cfg)
    doc = json.loads((tmp_path / wd.CONFIG_FILE).read_text())
    assert doc["sites"] == [] and doc["model"]["remat"] is False
    del doc["synthetic_sites"], doc["model"]["remat"]  # a work dir from before these fields
    (tmp_path / wd.CONFIG_FILE).write_text(json.dumps(doc))
    assert wd.prepare(tmp_path, cfg) == (tmp_path, True)
    back = wd.load_config(tmp_path)
    assert isinstance(back, ml_collections.ConfigDict)
    assert back["synthetic_sites"] == 4 and back["model"]["remat"] is False and back["sites"] == ()
    assert wd.to_plain(back) == wd.to_plain(cfg)
    with pytest.raises(UsageError, match="different config"):
        wd.prepare(tmp_path, parse_config([*TINY, "--config.synthetic_sites=3"])[0])


# ------------------------------------------------------------------- naming a config
def test_config_by_name_is_the_config_file():
    for name in ("synthetic:tiny=true", "prostate:method=fedsam,tiny=true", "demo"):
        stem, _, arg = name.partition(":")
        by_path = parse_config(["--config", f"{CONFIGS / stem}.py" + (f":{arg}" if arg else "")])[0]
        assert wd.to_plain(parse_config(["--config", name])[0]) == wd.to_plain(by_path)


def test_configs_path_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/<name>.py not here: the library's own file
    cfg, workdir = parse_config(["--config", "configs/prostate.py:method=fedsam,tiny=true"])
    assert cfg["method"] == "fedsam" and workdir == Path("runs") / "prostate_fedsam_federated"


@pytest.mark.parametrize("argv,needle", [
    (["--config", "nosuch"], "no config named 'nosuch' (known: "),
    (["--config", "benchmark"], "not a training config"),
    (["--config.nope=1"], "unknown config field 'nope'"),
])
def test_bad_config_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    code = run_cli(train.main, [*argv, "--workdir", str(tmp_path / "run")], "train")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------- protocol: the original's data rules
FEDFMS_DATA = dict(fundus_disc="rim", val_split="original", slice_orientation="xy", resize="cv2",
                   client_weights="rounded")
CLEAN_DATA = dict(fundus_disc="full", val_split="patient", slice_orientation="yx", resize="pil",
                  client_weights="exact")


def data_fields(cfg) -> dict:
    return {k: cfg[k] for k in FEDFMS_DATA}


@pytest.mark.parametrize("name", FEDERATIONS)
def test_paper_configs_follow_the_original_protocol(name, sam_weights_here):
    cfg, _ = parse_config(["--config", name])
    assert cfg["protocol"] == "fedfms" and data_fields(cfg) == FEDFMS_DATA
    cfg, _ = parse_config(["--config", name, "--config.protocol=clean"])
    assert cfg["protocol"] == "clean" and data_fields(cfg) == CLEAN_DATA


@pytest.mark.parametrize("argv", [TINY, ["--config", "demo"], ["--config", "synthetic"],
                                  ["--config", "prostate:tiny=true"], ["--config", "fundus", "--config.tiny=true"]])
def test_synthetic_demo_and_tiny_stay_clean(argv, sam_weights_here):
    cfg, _ = parse_config(argv)
    assert cfg["protocol"] == "clean" and data_fields(cfg) == CLEAN_DATA


def test_an_explicit_field_wins_over_the_protocol(sam_weights_here):
    cfg, _ = parse_config(["--config", "prostate", "--config.resize=pil", "--config.protocol=fedfms"])
    assert data_fields(cfg) == dict(FEDFMS_DATA, resize="pil")
    cfg, _ = parse_config(["--config", "fundus", "--config.val_split=original", "--config.protocol=clean"])
    assert data_fields(cfg) == dict(CLEAN_DATA, val_split="original")
    cfg, _ = parse_config([*TINY, "--config.protocol=fedfms", "--config.client_weights=exact"])
    assert data_fields(cfg) == dict(FEDFMS_DATA, client_weights="exact")  # tiny, the original's rules asked for


def test_the_nuclei_fedsam_batch_is_the_originals(sam_weights_here):
    assert parse_config(["--config", "nuclei:method=fedsam"])[0]["batch_size"] == 4
    assert parse_config(["--config", "nuclei:method=fedmsa"])[0]["batch_size"] == 4


@pytest.mark.parametrize("field,value", [("protocol", "paper"), ("fundus_disc", "cup"), ("val_split", "random"),
                                         ("slice_orientation", "zx"), ("resize", "cubic"),
                                         ("client_weights", "uniform")])
def test_bad_protocol_values_are_one_line_exit_2(field, value, capsys, tmp_path):
    code = run_cli(train.main, [*TINY, f"--config.{field}={value}", "--workdir", str(tmp_path / "run")], "train")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{field} must be one of" in err, err
    assert not (tmp_path / "run").exists()


def test_protocol_fields_reach_the_builder_options():
    from fedfms_jax.data.federations import builder_options, data_slice_orientation
    assert builder_options("fundus", **{k: FEDFMS_DATA[k] for k in ("fundus_disc", "val_split", "resize")}) == dict(
        disc_excludes_cup=True, val_split="original", resize="cv2")
    assert builder_options("prostate", slice_orientation="xy") == dict(
        slice_orientation="xy", val_split="patient", resize="pil")
    assert builder_options("fets", slice_orientation="xy") == dict(val_split="patient", resize="pil")
    assert builder_options("synthetic", resize="cv2") == {}
    assert data_slice_orientation("prostate", "xy") == "xy" and data_slice_orientation("fets", "xy") == "yx"


# ------------------------------------------------------------------- the paper configs' weights
@pytest.mark.parametrize("name", FEDERATIONS)
def test_paper_config_without_sam_weights_is_refused_with_the_recipe(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = run_cli(train.main, ["--config", f"{name}:method=fedsam", "--workdir", "run"], "train")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for part in ("weights/sam_vit_b does not exist",
                 "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
                 "python -m weights_convert convert --checkpoint sam_vit_b_01ec64.pth --out weights/sam_vit_b",
                 "--config.init_from=weights/sam_vit_b"):
        assert part in err, err
    assert list(tmp_path.iterdir()) == []  # neither the work dir nor anything else written


def test_paper_config_random_init_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_config(["--config", "prostate", "--config.init_from=random"])[0]["init_from"] == "random"
    assert parse_config(["--config", "prostate:tiny=true"])[0]["init_from"] == "random"


# ------------------------------------------------------------------- --help
def test_train_help_lists_options_and_fields(capsys):
    assert run_cli(train.main, ["--help"], "train") == 0
    out = capsys.readouterr().out
    assert "--config NAME|FILE[:ARGS]" in out and "--workdir DIR" in out
    assert "config fields of demo" in out and "--config.rounds=8" in out and "--config.model.encoder='tiny_vit'" in out
    assert run_cli(train.main, ["--config", "fets:method=fedmsa", "-h"], "train") == 0
    out = capsys.readouterr().out
    assert "--config.batch_size=8" in out and "--config.init_from='weights/sam_vit_b'" in out


@pytest.mark.parametrize("module,needles", [
    ("fedfms_jax.train", ["--workdir DIR", "--config.lr=0.001"]),
    ("fedfms_jax.predict", ["--weights DIR", "--input FILE", "--box x0,y0,x1,y1"]),
    ("fedfms_jax.evaluate", ["--workdir DIR", "--round R"]),
    ("fedfms_jax.benchmark", ["--no-torch", "image_size=256"]),
    ("weights_convert", ["convert", "export"]),
])
def test_help_from_the_command_line(module, needles, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    for needle in needles:
        assert needle in proc.stdout, (needle, proc.stdout)


# ------------------------------------------------------------------- packaging
def test_every_package_is_installed():
    """pyproject lists its packages (to map configs/ to fedfms_jax.configs): none left out."""
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert doc["package-dir"] == {"fedfms_jax.configs": "configs"}
    folders = {str(p.parent.relative_to(REPO)).replace("/", ".")
               for top in ("fedfms_jax", "weights_convert") for p in (REPO / top).rglob("__init__.py")}
    assert set(doc["packages"]) == folders | {"fedfms_jax.configs"}
    assert (REPO / "configs" / "__init__.py").is_file()


def test_loss_field_reaches_the_engine():
    """loss=dice_bce trains on BCE + soft Dice; anything else is refused in one line."""
    import numpy as np
    from fedfms_jax import losses, model_init, run_state
    cfg = parse_config([*TINY, "--config.loss=dice_bce"])[0]
    engine = run_state.make_engine(cfg, model_init.build_model(cfg)[1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    y = (rng.random((2, 8, 8, 1)) > 0.7).astype(np.uint8)
    np.testing.assert_allclose(float(engine.loss(x, y)), float(losses.dice_bce(x, y)), rtol=1e-6)
    assert abs(float(losses.dice_bce(x, y)) - float(losses.bce_with_logits(x, y))) > 1e-3
    cfg.loss = "focal"
    with pytest.raises(UsageError, match="loss must be one of bce, dice_bce"):
        run_config.validate(cfg)
