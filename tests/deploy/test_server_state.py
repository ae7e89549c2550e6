"""The server's state survives a restart: orbax checkpoint + metrics.jsonl, resumed from
the same work dir; a different config is refused."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from fedfms_jax.cli_errors import UsageError
from tests.deploy.harness import REPO

ARGV = ["--config", str(REPO / "configs" / "synthetic.py") + ":tiny=true", "--config.synthetic_sites=3",
        "--config.no_unseen=true", "--config.server_optimizer=fedadam", "--config.server_lr=0.01"]


@pytest.mark.slow
def test_server_state_resumes_after_restart(tmp_path):
    from fedfms_jax import train
    from fedfms_jax.deploy import protocol
    from fedfms_jax.checkpoint import global_params
    from fedfms_jax.deploy.server_state import ServerState
    cfg, _ = train.parse_config(ARGV)
    cfg["deploy"] = protocol.deploy_options({})
    wd = tmp_path / "run"
    s = ServerState(cfg, wd)
    assert not s.resuming and s.restore_latest() == 0
    g0 = jax.tree.map(np.copy, s.global_params)
    rng = np.random.default_rng(0)
    for r in (1, 2):
        ups = [[rng.normal(size=x.shape).astype(np.float32) * 1e-3 for x in s.leaves()] for _ in range(3)]
        finite = s.step(ups, s.weights([4, 8, 12], 24))
        assert finite.all()
        s.log_round({"round": r})
        s.save()
    s.log_round({"round": 3})  # logged, then the server died before its checkpoint
    g2, opt2 = s.global_params, s.server_opt_state
    s.close()

    back = ServerState(cfg, wd)
    assert back.resuming and back.restore_latest() == 2
    assert sorted(back.records()) == [1, 2]  # the uncheckpointed round is redone
    for a, b in zip(jax.tree.leaves(back.global_params), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(back.server_opt_state), jax.tree.leaves(opt2)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g0)))
    flat = global_params(wd)[1]
    assert set(flat) == set(back.partition.trainable_paths)
    # The run ends with the same portable final/ model a simulation writes: the global
    # trained leaves of the last checkpointed round, beside the frozen ones.
    from fedfms_jax.trained_model import load_trained
    from weights_convert.store import read_params
    back.write_results(["site0", "site1", "site2"], None, {})
    assert load_trained(wd).round == 2
    stored = read_params(wd / "final")
    for path, value in zip(back.partition.trainable_paths, back.partition.flatten_trainable(back.global_params)):
        np.testing.assert_array_equal(np.asarray(stored[path]), np.asarray(value), err_msg=path)
    assert len(stored) > len(back.partition.trainable_paths)  # frozen leaves are there too
    back.close()

    other = dict(cfg, lr=0.5)
    with pytest.raises(UsageError, match="different config"):
        ServerState(other, wd)
