"""Bad input: one line on stderr, exit code 2, an existing work dir left byte-identical."""

import pytest

from fedfms_jax import train
from fedfms_jax.cli_errors import run_cli
from tests.train.conftest import TINY, TINY_RUN_GROUP, snapshot


def _run(argv, capsys):
    code = run_cli(train.main, argv, "train")
    err = capsys.readouterr().err.strip()
    return code, err


def _variant_weights(tmp_path):
    """A weights_convert directory holding a different model variant (2 classes)."""
    from flax import nnx
    from fedfms_jax.models.sam import build_sam
    from fedfms_jax.run_state import model_init
    from weights_convert.store import save_weights
    cfg = _tiny_cfg()  # a fresh ConfigDict of its own
    cfg["num_classes"] = 2
    scfg = model_init.sam_config(cfg)
    model = build_sam(scfg, rngs=nnx.Rngs(0))
    return save_weights(tmp_path / "other_variant", model, scfg)


def _tiny_cfg():
    from fedfms_jax.train import parse_config
    return parse_config(TINY)[0]


CASES = {
    "unknown_field": (["--config.no_such_field=1"], "unknown config field"),
    "mistyped_value": (["--config.rounds=many"], "cannot parse"),
    "mistyped_config_arg": ([], "unknown config argument"),  # replaced below
    "missing_weights_dir": (["--config.init_from=/nonexistent/weights"], "does not exist"),
    "bad_image_size": (["--config.image_size=72"], "not divisible"),
    "missing_manual_files": (["--config.federation=prostate", "--config.manual_dir=/nonexistent/raw",
                              "--config.data_dir=/nonexistent/tfds"], "prostate"),
    "different_config": (["--config.lr=0.5"], "different config"),
}


@pytest.mark.slow
@TINY_RUN_GROUP
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_leaves_existing_workdir_untouched(tiny_run, tmp_path, capsys, case):
    extra, needle = CASES[case]
    argv = [*TINY, *extra]
    if case == "mistyped_config_arg":
        argv = ["--config", TINY[1] + ",methd=fedsam"]
    if case != "different_config":  # a fresh work dir: the error itself, and no dir created
        fresh = tmp_path / "fresh"
        code, err = _run([*argv, "--workdir", str(fresh)], capsys)
        assert code == 2, err
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not fresh.exists()
    before = snapshot(tiny_run)
    code, err = _run([*argv, "--workdir", str(tiny_run)], capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    if case == "different_config":
        assert needle in err, err
    assert snapshot(tiny_run) == before


@pytest.mark.slow
@TINY_RUN_GROUP
def test_checkpoint_of_another_variant(tiny_run, tmp_path, capsys):
    weights = _variant_weights(tmp_path)
    before = snapshot(tiny_run)
    code, err = _run([*TINY, f"--config.init_from={weights}", "--workdir", str(tmp_path / "new")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "another model variant" in err, err
    assert not (tmp_path / "new").exists()
    # Same refusal against the existing work dir (its config differs too, so either message).
    code, err = _run([*TINY, f"--config.init_from={weights}", "--workdir", str(tiny_run)], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert snapshot(tiny_run) == before


def test_non_writable_workdir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for workdir in (blocker / "run", "/proc/fedfms_no_such_dir/run"):
        code, err = _run([*TINY, "--workdir", str(workdir)], capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "work dir" in err
    assert blocker.read_text() == "x"


def test_foreign_nonempty_dir_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, err = _run([*TINY, "--workdir", str(tmp_path)], capsys)
    assert code == 2 and "not empty" in err
    assert snapshot(tmp_path) == before


def test_unknown_flag_and_missing_config(capsys, tmp_path):
    code, err = _run(["--confg", "x"], capsys)
    assert code == 2 and "unknown flag" in err
    code, err = _run(["--config", str(tmp_path / "nope.py")], capsys)
    assert code == 2 and "not found" in err
