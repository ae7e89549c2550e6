"""A run killed (SIGKILL) after round k and resumed ends exactly like an uninterrupted run."""
import json
import time

import jax
import numpy as np
import pytest

from fedfms_jax import checkpoint, run_state, workdir as wd
from fedfms_jax.checkpoint import Checkpointer
from tests.train.conftest import TINY, TINY_RUN_GROUP, run_module, start_module

pytestmark = pytest.mark.slow


def _final_state(workdir):
    run = run_state.restore_run(workdir)
    assert run.round == 2
    return jax.tree.map(np.asarray, checkpoint.to_tree(run.state))


def _kill_once_checkpointed(proc, step_dir, log, timeout=1800):
    """SIGKILL `proc` as soon as `step_dir` exists: orbax writes a checkpoint into a
    temporary directory and renames it to the round number once it is complete."""
    deadline = time.time() + timeout
    while not step_dir.is_dir():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"no checkpoint {step_dir.name} to kill after:\n{log.read_text()[-2000:]}")
        time.sleep(0.01)
    proc.kill()
    proc.wait()


@TINY_RUN_GROUP
def test_kill_and_resume_matches_uninterrupted(tmp_path, tiny_run):
    """The uninterrupted run is the session's tiny run (the same command, 2 rounds)."""
    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    proc = start_module("fedfms_jax.train", [*TINY, "--workdir", str(killed)], log)
    _kill_once_checkpointed(proc, killed / wd.CKPT_DIR / "1", log)
    assert proc.returncode == -9, log.read_text()[-2000:]
    assert Checkpointer(killed / wd.CKPT_DIR).latest_round() == 1
    assert not (killed / wd.RESULTS_FILE).exists()

    proc = run_module("fedfms_jax.train", [*TINY, "--workdir", str(killed)])  # the same command again
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "continuing after round 1" in proc.stdout

    straight = tiny_run
    a, b = _final_state(killed), _final_state(straight)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    ra = json.loads((killed / wd.RESULTS_FILE).read_text())
    rb = json.loads((straight / wd.RESULTS_FILE).read_text())
    assert ra["final"] == rb["final"] and ra["initial"] == rb["initial"]
    from weights_convert.store import read_params
    fa, fb = read_params(killed / "final"), read_params(straight / "final")  # the portable model too
    assert set(fa) == set(fb)
    for name in fa:
        np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)
    rounds = [json.loads(l)["round"] for l in (killed / wd.METRICS_FILE).read_text().splitlines()]
    assert rounds == [0, 1, 2]


def test_nan_loss_stops_naming_round_and_client(tmp_path, monkeypatch, capsys):
    """Updates turn NaN from the third local step (round 2): the run stops there."""
    import optax
    from fedfms_jax import train
    from fedfms_jax.cli_errors import run_cli

    real = run_state.client_optimizer

    def poisoned(cfg):
        def scale(count):
            return jax.numpy.where(count >= 2, jax.numpy.nan, 1.0)
        return optax.chain(real(cfg), optax.scale_by_schedule(scale))

    monkeypatch.setattr(run_state, "client_optimizer", poisoned)
    workdir = tmp_path / "nan"
    code = run_cli(train.main, [*TINY, "--workdir", str(workdir)], "train")
    err = capsys.readouterr().err.strip()
    assert code == 3, err
    assert len(err.splitlines()) == 1 and "round 2" in err and "client site1" in err, err
    assert Checkpointer(workdir / wd.CKPT_DIR).all_rounds() == [1]
    assert not (workdir / wd.RESULTS_FILE).exists()
    restored = run_state.restore_run(workdir)
    assert restored.round == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.global_params))
