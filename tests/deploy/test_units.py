"""Flower-free parts of the deployment: DP clipping/noise and accounting, payload
conversion, TLS material, the server's aggregation."""
from __future__ import annotations

import flwr  # noqa: F401  (fail loudly without the [flower] extra)
import jax.numpy as jnp
import numpy as np
import pytest

from fedfms_jax.deploy import dp as dp_lib, payload, protocol, tls


# ------------------------------------------------------------------------------- DP
def test_clip_bounds_the_norm_and_keeps_small_updates():
    rng = np.random.default_rng(0)
    big = [rng.normal(size=(30, 20)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
    out, norm, scale = dp_lib.clip_and_noise(big, dp_lib.DPConfig(clip=0.5), rng)
    got = np.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64))) for x in out))
    assert norm > 0.5 and scale < 1
    assert abs(got - 0.5) < 1e-6
    small = [x * 1e-3 for x in big]
    out, _, scale = dp_lib.clip_and_noise(small, dp_lib.DPConfig(clip=10.0), rng)
    assert scale == 1.0
    np.testing.assert_allclose(out[0], small[0], rtol=1e-6)


def test_noise_has_the_configured_std():
    rng = np.random.default_rng(1)
    zeros = [np.zeros((400, 250), np.float32)]
    out, _, _ = dp_lib.clip_and_noise(zeros, dp_lib.DPConfig(clip=2.0, noise_multiplier=0.7), rng)
    assert abs(float(out[0].std()) - 1.4) < 0.01
    assert abs(float(out[0].mean())) < 0.01


def test_epsilon_from_the_accountant():
    e = dp_lib.epsilon(1.0, 10, 1e-5)
    assert 0 < e < float("inf")
    assert dp_lib.epsilon(2.0, 10, 1e-5) < e < dp_lib.epsilon(1.0, 100, 1e-5)
    assert dp_lib.epsilon(1.0, 0, 1e-5) == 0.0 and dp_lib.epsilon(0.0, 3, 1e-5) == float("inf")
    # RDP is an upper bound: at least the (tighter) PLD accountant's epsilon, not far above.
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant as pld
    acc = pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.0), 10)
    tight = acc.get_epsilon(1e-5)
    assert tight <= e <= 1.6 * tight
    rec = dp_lib.budget_record(dp_lib.DPConfig(1.0, 1.0, 1e-5), 10)
    assert rec["epsilon"] == pytest.approx(e) and rec["rounds"] == 10


# ------------------------------------------------------------------------- payload
@pytest.fixture(scope="module")
def partition():
    from fedfms_jax.federated.partition import make_partition
    params = {"image_encoder": {"w": jnp.ones((3, 4)), "A": {"b": jnp.zeros(5)}},
              "mask_decoder": {"k": jnp.arange(6.0).reshape(2, 3)}}
    return make_partition(params, [("^image_encoder/w", False), (".*", True)]), params


def test_payload_round_trip_only_trainable(partition):
    part, params = partition
    trainable, _ = part.split(params)
    rec = payload.tree_to_record(part, trainable)
    assert set(rec.keys()) == {"image_encoder/A/b", "mask_decoder/k"}
    back = payload.record_to_tree(part, rec)
    np.testing.assert_array_equal(back["mask_decoder"]["k"], np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(back["image_encoder"]["A"]["b"], np.zeros(5))


def test_payload_mismatch_is_refused(partition):
    part, _ = partition
    bad = protocol.leaves_to_record(["image_encoder/A/b", "mask_decoder/k"],
                                   [np.zeros(5, np.float32), np.zeros((3, 2), np.float32)])
    with pytest.raises(ValueError, match="mask_decoder/k"):
        payload.record_to_leaves(part, bad)
    with pytest.raises(ValueError, match="missing"):
        payload.record_to_leaves(part, protocol.leaves_to_record(["mask_decoder/k"], [np.zeros((2, 3))]))


def test_certificates_chain_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    paths = tls.make_certificates(tmp_path, ("localhost", "127.0.0.1", "link.example.org"))
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example.org" in san.get_values_for_type(x509.DNSName)
    priv, pub = tls.make_node_keys(tmp_path, "node_0")
    key = serialization.load_ssh_private_key(priv.read_bytes(), None)  # as flower-supernode reads it
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert serialization.load_ssh_public_key(pub.read_bytes()).public_numbers() == key.public_key().public_numbers()


# ------------------------------------------------------------------- aggregation
def test_server_mean_matches_weighted_mean_and_drops_non_finite():
    from fedfms_jax.deploy.server_state import aggregate_updates
    from fedfms_jax.federated.server_optim import server_optimizer
    rng = np.random.default_rng(2)
    ups = rng.normal(size=(3, 4, 5)).astype(np.float32)
    ups[2, 0, 0] = np.nan
    w = np.array([0.2, 0.5, 0.3], np.float32)
    # FedAvg from an all-zero global model: the new global model is the mean update.
    fedavg = server_optimizer("fedavg")
    zero = {"x": jnp.zeros((4, 5), jnp.float32)}
    mean, _, finite = aggregate_updates(fedavg, zero, fedavg.tx.init(zero), {"x": jnp.asarray(ups)},
                                        jnp.asarray(w))
    assert list(np.asarray(finite)) == [True, True, False]
    ref = (0.2 * ups[0].astype(np.float64) + 0.5 * ups[1]) / 0.7
    np.testing.assert_allclose(np.asarray(mean["x"]), ref, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------- run config
def test_run_config_is_the_training_clis(tmp_path, monkeypatch):
    from fedfms_jax import train
    from fedfms_jax.deploy.server_app import training_config
    from tests.deploy.harness import REPO
    argv = ["--config", str(REPO / "configs" / "synthetic.py") + ":tiny=true",
            "--config.synthetic_sites=3", "--config.no_unseen=true", "--config.eval_every=2"]
    monkeypatch.chdir(tmp_path)  # a relative path not found here names the repository's configs/
    got = training_config("configs/synthetic.py:tiny=true", "synthetic_sites=3 no_unseen=true eval_every=2")
    assert got == train.parse_config(argv)[0]
    # tiny given as an override shrinks the config as the training CLI's does
    assert training_config("configs/synthetic.py", "tiny=true") == train.parse_config(
        ["--config", str(REPO / "configs" / "synthetic.py"), "--config.tiny=true"])[0]
    with pytest.raises(ValueError, match="field=value"):
        training_config("configs/synthetic.py", "tiny")


def test_tls_command_refuses_to_replace_an_existing_ca(tmp_path, capsys):
    """A second run into the same folder would invalidate every hospital's certificate
    and key: one line, exit 2, nothing rewritten."""
    out = tmp_path / "certs"
    assert tls.main([str(out), "--host", "superlink.example.org", "--nodes", "2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"ca.crt", "server.pem", "server.key", "node_0", "node_1.pub"} <= set(before)
    assert tls.main([str(out), "--nodes", "2"]) == 2
    assert "ca.crt exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
