"""A real Flower federation on localhost: SuperLink + SuperNodes with TLS and SuperNode
authentication, each hospital with its long-lived site worker, on fake raw prostate MRI in
the SAML release layout; the tiny model, 2 rounds.

Each node's manual_dir holds only its own site (BIDMC, HK, I2CVB train); a fourth node,
for the unseen site ISBI, has an empty folder: it drops out with its reason in the
server's log and the federation goes on without it.

Checked: the final global trainable parameters equal the simulation engine's on the same
data and seeds (plain and under SecAgg+), and `predict` reads the deployment's final/; a
SuperNode killed mid-round (the round completes with the others, weights renormalised:
equal to the engine's round with that client masked out; the node rejoins the next
round; nothing lost on the server); a FedSAM ViT-B sized payload (375 MB) to a node and back.

flwr comes with the [test] extra: an ImportError here is a failure, not a skip.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import flwr  # noqa: F401  (fail loudly without the [flower] extra)
import numpy as np
import pytest

from tests.data import fake_raw
from tests.deploy.harness import REPO, LocalFederation

# One federation for the module: keep its tests in one xdist worker (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower")]

TRAIN_SITES = ["BIDMC", "HK", "I2CVB"]
EMPTY_SITE = "ISBI"  # the unseen site's hospital, whose folder is empty
CONFIG = "configs/prostate.py:tiny=true"
OVERRIDES = ["federation=prostate", "sites=('BIDMC','HK','I2CVB','ISBI')", "unseen=3", "eval_every=2"]
RUN_TIMEOUT = 900  # the machine running the suite may be shared and slow


def rel_err(got: dict, ref: dict) -> float:
    assert set(got) == set(ref), (sorted(set(got) ^ set(ref)))[:5]
    num = sum(float(np.sum((got[k].astype(np.float64) - ref[k]) ** 2)) for k in ref)
    den = sum(float(np.sum(np.asarray(ref[k], np.float64) ** 2)) for k in ref)
    return (num / den) ** 0.5


def _write_site(root, i: int, site: str):
    fake_raw.prostate_site(root, site, np.random.default_rng(i))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Every site's files for the simulation, and one folder per hospital holding only its own."""
    from fedfms_jax.data.registry import FEDERATIONS
    root = tmp_path_factory.mktemp("prostate")
    for i, site in enumerate(FEDERATIONS["prostate"].sites):  # the simulation builds every site
        _write_site(root / "all", i, site)
        if site in TRAIN_SITES:
            _write_site(root / f"hospital_{site}", i, site)  # the same files, alone
    (root / f"hospital_{EMPTY_SITE}").mkdir()
    return root


@pytest.fixture(scope="module")
def federation(tmp_path_factory, raw):
    root = tmp_path_factory.mktemp("flower")
    nodes = [{"site": s, "manual-dir": str(raw / f"hospital_{s}"), "data-dir": str(root / f"tfds_{s}")}
             for s in TRAIN_SITES + [EMPTY_SITE]]
    fed = LocalFederation(root, nodes)
    try:
        fed.start_superlink()
        for i in range(len(nodes)):
            fed.start_supernode(i)
        _warm_compilation_cache(fed, raw)
        yield fed
    finally:
        fed.close()


_WARM_UP = """if True:
    import json, sys
    import jax, numpy as np
    from fedfms_jax.deploy import site_worker
    trainer = site_worker.trainer_for(json.loads(sys.argv[1]), json.loads(sys.argv[2]))
    tree = jax.device_get(trainer.engine.initial_trainable)
    leaves = [np.asarray(x) for x in trainer.partition.flatten_trainable(tree)]
    trainer.train(leaves, 1, None)
    trainer.evaluate(leaves)
"""


def _warm_compilation_cache(fed: LocalFederation, raw) -> None:
    """One hospital's programs compiled once into the test run's shared compilation cache
    before the runs start, as a hospital's own cache holds them after its first run: the
    nodes then load them instead of compiling the same programs side by side on the test
    machine's few cores (each node still builds its model and data on its first message)."""
    from fedfms_jax import train, workdir
    cfg, _ = train.parse_config(["--config", str(REPO / CONFIG), *[f"--config.{o}" for o in OVERRIDES]])
    site = TRAIN_SITES[0]
    node = {"site": site, "manual_dir": str(raw / f"hospital_{site}"), "data_dir": str(fed.root / "tfds_warm_up")}
    subprocess.run([sys.executable, "-c", _WARM_UP, json.dumps(workdir.to_plain(cfg)), json.dumps(node)],
                   cwd=fed.root, env=fed.env, check=True, timeout=600, capture_output=True)


@pytest.fixture(scope="module")
def simulation(raw, tmp_path_factory):
    """The simulation engine on the same config and data (every site in one folder):
    globals after rounds 1 and 2, and the round-1 global with client 2 left out
    (participation mask)."""
    from fedfms_jax import run_state, train
    from fedfms_jax.federated import mesh as mesh_lib
    argv = ["--config", str(REPO / CONFIG), *[f"--config.{o}" for o in OVERRIDES],
            f"--config.manual_dir={raw / 'all'}", f"--config.data_dir={tmp_path_factory.mktemp('sim_tfds')}"]
    cfg, _ = train.parse_config(argv)
    run = run_state.build_run(cfg)
    assert run.train_sites == TRAIN_SITES
    sources = run_state.client_sources(cfg, run.fed, run.train_sites)[1]
    loader = run_state.make_loader(cfg, sources)
    weights = np.asarray(loader.num_samples, np.float32)
    weights = weights / weights.sum()
    part = run.engine.partition

    def flat(state):
        return {p: np.asarray(mesh_lib.to_host(x))
                for p, x in zip(part.trainable_paths, part.flatten_trainable(state.global_params))}

    batches = [run_state.round_batches(loader, cfg, r) for r in (1, 2)]
    loader.close()
    out = {}
    state = run.engine.init(len(run.clients))
    for r, b in enumerate(batches, 1):
        state, _ = run.engine.run_round(state, b, weights)
        out[r] = flat(state)
    state = run.engine.init(len(run.clients))
    state, m = run.engine.run_round(state, batches[0], weights, participating_mask=np.array([True, True, False]))
    out["round1_without_site2"] = flat(state)
    out["clients"] = run.clients
    return out


def _run_config(workdir, **kw):
    rc = {"config": CONFIG, "overrides": " ".join(OVERRIDES), "workdir": str(workdir), "min-nodes": 4,
          "round-timeout": 300.0, "wait-nodes-timeout": 120.0}
    rc.update(kw)
    return rc


def _records(workdir):
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def side_by_side(federation):
    """The plain and the SecAgg+ run, submitted together: Flower runs them side by side on
    the same nodes (each node's worker answers one request at a time)."""
    runs = {"plain": {}, "secagg": {"secagg": True, "evaluate": False}}
    for name, kw in runs.items():
        federation.submit(_run_config(federation.root / name, **kw))
    return {name: federation.root / name for name in runs}


def test_tls_run_equals_simulation(federation, side_by_side, request):
    from fedfms_jax.checkpoint import global_params
    wd = side_by_side["plain"]
    simulation = request.getfixturevalue("simulation")  # while the federation runs
    federation.wait_file(wd / "results.json", RUN_TIMEOUT)
    err = rel_err(global_params(wd)[1], simulation[2])
    assert err <= 1e-5, err
    recs = _records(wd)
    assert [r["round"] for r in recs] == [0, 1, 2]
    assert all(r["participants"] == TRAIN_SITES for r in recs[1:])
    res = json.loads((wd / "results.json").read_text())
    assert res["rounds"] == 2 and set(res["final"]["sites"]) == set(TRAIN_SITES)
    # The hospital with an empty folder dropped out, its reason in the server's log.
    dropped = [l for l in (wd / "server.log").read_text().splitlines() if "dropped" in l]
    assert len(dropped) == 1 and f"(site {EMPTY_SITE}) dropped: fedfms_prostate: manual_dir is missing or empty; " \
        "expected layout: <manual_dir>/{BIDMC," in dropped[0], dropped
    assert res["comm_bytes_per_round_per_client"] > 0
    # The deployment leaves the same portable final/ model as a simulation: predict reads it.
    from PIL import Image
    from fedfms_jax import predict
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52), dtype=np.uint8)).save(wd / "in.png")
    assert predict.main(["--weights", str(wd), "--input", str(wd / "in.png"), "--out", str(wd / "mask.png")]) == 0
    assert np.asarray(Image.open(wd / "mask.png")).shape == (40, 52)


def test_secagg_run_equals_simulation(federation, side_by_side, simulation):
    from fedfms_jax.checkpoint import global_params
    wd = side_by_side["secagg"]
    federation.wait_file(wd / "results.json", RUN_TIMEOUT)
    err = rel_err(global_params(wd)[1], simulation[2])
    assert err <= 1e-5, err
    recs = _records(wd)
    assert [r["round"] for r in recs] == [1, 2]  # no evaluation: no round-0 record
    assert all(r["secagg"] and r["participants"] == TRAIN_SITES for r in recs)


def test_supernode_killed_mid_round(federation, simulation):
    from fedfms_jax.checkpoint import global_params
    wd = federation.root / "killed"
    log = federation.logs["supernode_2"]
    seen = log.read_text(errors="replace").count("Receiving: train message")
    federation.submit(_run_config(wd, evaluate=False, **{"round-timeout": 150.0}))
    deadline = time.time() + RUN_TIMEOUT
    while log.read_text(errors="replace").count("Receiving: train message") <= seen:
        assert time.time() < deadline, federation.tail("supernode_2")
        time.sleep(0.2)
    federation.kill("supernode_2")  # while its ClientApp trains round 1
    while not (wd / "metrics.jsonl").exists() or 1 not in [r["round"] for r in _records(wd)]:
        assert time.time() < deadline, federation.tail("superlink")
        time.sleep(0.5)
    federation.start_supernode(2)  # the hospital comes back for round 2
    federation.wait_file(wd / "results.json", max(10.0, deadline - time.time()))
    recs = {r["round"]: r for r in _records(wd)}
    assert sorted(recs) == [1, 2]  # no evaluation in this run: no round-0 record
    assert recs[1]["participants"] == TRAIN_SITES[:2]
    assert recs[2]["participants"] == TRAIN_SITES
    # Round 1 with the killed site's weight renormalised away = the engine's masked round.
    err = rel_err(global_params(wd, 1)[1], simulation["round1_without_site2"])
    assert err <= 1e-5, err
    assert rel_err(global_params(wd, 1)[1], simulation[1]) > 1e-4  # and not the full round
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    assert (wd / "results.json").exists()


def test_fedsam_vit_b_payload_round_trip(federation):
    wd = federation.root / "payload"
    federation.run_app({"payload-check": True, "workdir": str(wd), "round-timeout": 300.0},
                       RUN_TIMEOUT, wd / "payload.json")
    out = json.loads((wd / "payload.json").read_text())
    assert "error" not in out, out
    assert out["params"] == 93_735_472 and out["bytes"] == 4 * 93_735_472
    assert out["node_sha256"] == out["sent_sha256"] == out["returned_sha256"]
    assert out["returned_bytes"] == out["bytes"]
    assert out["max_array_chunk_bytes"] < out["bytes"] / 50  # streamed in chunks, not one message


@pytest.mark.parametrize("credentials", ["unregistered_key", "no_key"])
def test_supernode_without_valid_credentials_is_refused(federation, credentials):
    """A hospital machine whose public key was never registered with
    `flwr supernode register` (or that presents none) cannot join: its SuperNode exits
    with Flower's connection error and the federation still lists only the three nodes."""
    from fedfms_jax.deploy import tls
    name = f"intruder_{credentials}"
    key = tls.make_node_keys(federation.root / "certs", name)[0] if credentials == "unregistered_key" else None
    proc = federation.start_node(name, federation.nodes[0], key)
    try:
        rc = proc.wait(timeout=180)
    finally:
        federation.kill(name)
    log = federation.tail(name)
    assert rc != 0, log
    assert "Failed to initialize the connection to the SuperLink" in log, log
    listed = json.loads(federation.flwr(["supernode", "list", "hospitals", "--format", "json"], timeout=60).stdout)
    assert listed["success"], listed
    assert len(listed["nodes"]) == len(federation.nodes), listed
