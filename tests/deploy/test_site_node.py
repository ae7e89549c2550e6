"""A hospital's node without Flower: it reads only its own site, checks the starting
weights against the server's hash, and refuses bad input with one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.data import fake_raw
from tests.deploy.harness import REPO

OVERRIDES = ["federation=prostate", "sites=('BIDMC','HK','I2CVB','ISBI')", "unseen=3"]


@pytest.fixture(scope="module")
def cfg():
    from fedfms_jax import train, workdir
    c, _ = train.parse_config(["--config", str(REPO / "configs" / "prostate.py") + ":tiny=true",
                               *[f"--config.{o}" for o in OVERRIDES]])
    return workdir.to_plain(c)  # as the server sends it


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospital")
    fake_raw.prostate_site(root / "raw", "HK", np.random.default_rng(1))
    (root / "empty").mkdir()
    return root


def _request(cfg, hospital, kind="query", **node):
    node = dict({"site": "HK", "manual_dir": str(hospital / "raw"), "data_dir": str(hospital / "tfds")}, **node)
    return {"kind": kind, "cfg": json.dumps(cfg), "node": node, "weights_sha256": ""}


def test_node_reads_its_own_site_and_matches_the_server_weights(cfg, hospital, tmp_path):
    from fedfms_jax.deploy import site_worker
    from fedfms_jax.deploy.server_state import ServerState
    request = _request(cfg, hospital)
    answer = site_worker.handle(request)
    assert answer["info"] == {"site": "HK", "trains": 1, "unseen": 0, "index": 1, "num_samples": 10}, answer
    trainer = site_worker.trainer_for(cfg, request["node"])
    assert site_worker.trainer_for(cfg, request["node"]) is trainer  # built once, kept
    assert trainer.fed.sites == ["HK"]
    server = ServerState(cfg, tmp_path / "run")  # builds no federation: no data given to it
    assert server.weights_sha256 == trainer.weights_sha256
    server.close()
    wrong = dict(_request(cfg, hospital), weights_sha256="0" * 64)
    refused = site_worker.handle(wrong)["refused"]
    assert refused.startswith("starting weights differ from the server's") and "\n" not in refused


@pytest.mark.parametrize("node, expected", [
    ({"manual_dir": "EMPTY"}, r"manual_dir is missing or empty; expected layout: <manual_dir>/\{BIDMC,HK"),
    ({"site": "BIDMC"}, r"missing site folder .*BIDMC; expected layout"),
    ({"site": "Mars"}, r"site 'Mars' is not in prostate"),
    ({"weights_dir": "NOWHERE"}, r"init_from: weights directory .*NOWHERE does not exist"),
])
def test_bad_node_is_refused_in_one_line(cfg, hospital, node, expected):
    import re
    from fedfms_jax.deploy import site_worker
    node = {k: str(hospital / "empty") if v == "EMPTY" else str(hospital / v) if v == "NOWHERE" else v
            for k, v in node.items()}
    refused = site_worker.handle(_request(cfg, hospital, data_dir=str(hospital / "tfds_bad"), **node))["refused"]
    assert re.search(expected, refused), refused
    assert "\n" not in refused
