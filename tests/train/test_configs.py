"""Every config file loads in every variant; arguments and overrides are typed and checked."""
from pathlib import Path

import pytest

from fedfms_jax import config_cli
from fedfms_jax.cli_errors import UsageError
from fedfms_jax.train import parse_config
from tests.train.conftest import TINY

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FEDERATIONS = ["prostate", "fundus", "nuclei", "fets", "ctlung", "isic", "chaos"]


@pytest.mark.parametrize("name", FEDERATIONS)
@pytest.mark.parametrize("method", ["fedmsa", "fedsam"])
@pytest.mark.parametrize("mode", ["federated", "centralized", "local"])
def test_federation_variants(name, method, mode):
    cfg, workdir = parse_config(["--config", f"{CONFIGS / name}.py:method={method},mode={mode},unseen=1"])
    assert cfg["federation"] == name and cfg["method"] == method and cfg["mode"] == mode
    assert cfg["unseen"] == 1 and cfg["model"]["adapters"] == (method == "fedmsa")
    assert cfg["lr"] == 1e-4 and cfg["pos_weight"] == 2.0 and cfg["image_size"] == 1024
    assert cfg["num_classes"] == (2 if name == "fundus" else 1)
    expected_batch = {"fedsam": 6, "fedmsa": 8 if name == "fets" else 4}[method]
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
    assert cfg["sites"] == ["a", "b"]
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
    out = config_cli.parse_config_args("a=3,b=x,c=true", {"a": 0, "b": "", "c": False, "d": 1.5})
    assert out == {"a": 3, "b": "x", "c": True, "d": 1.5}


@pytest.mark.parametrize("loop, chunk", [("vmap", None), ("sequential", 1)])
def test_client_loop_selects_the_engines_client_chunk(loop, chunk):
    from fedfms_jax import model_init
    from fedfms_jax.run_state import make_engine
    cfg = parse_config([*TINY, f"--config.client_loop={loop}"])[0]
    engine = make_engine(cfg, model_init.build_model(cfg)[1])
    assert engine.client_chunk == chunk


def test_unknown_client_loop_is_refused():
    from fedfms_jax.run_state import make_engine
    cfg = parse_config([*TINY, "--config.client_loop=threads"])[0]
    with pytest.raises(UsageError, match="client_loop must be vmap or sequential"):
        make_engine(cfg, None)
