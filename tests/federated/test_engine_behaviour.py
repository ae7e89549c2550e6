"""Frozen leaves untouched, unseen site without influence, failed and absent clients
dropped with renormalised weights, server optimizers, options (one compile per engine)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedfms_jax.federated import aggregate, comm, mesh as mesh_lib
from fedfms_jax.federated.round import FederatedEngine
from fedfms_jax.federated.server_optim import server_optimizer
from tests.federated import tiny

B = 2
SIZES = (4, 3, 4, 2)
NAN_PIXEL = 7  # a batch whose pixels are all 7 makes the forward return NaN


def poisoned_forward(model, images):
    logits = tiny.tiny_forward(model, images)
    return logits + jnp.where(jnp.all(images == NAN_PIXEL), jnp.nan, 0.0)


@functools.lru_cache(maxsize=None)
def _model():
    return tiny.make_tiny_sam(0)


def _engine(**kw):
    kw.setdefault("client_optimizer", optax.adam(1e-3))
    return FederatedEngine(_model(), kw.pop("preset", "fedmsa"), forward=poisoned_forward,
                           mesh=mesh_lib.client_mesh(jax.devices()), **kw)


def _batches(data):
    return tiny.pack([tiny.client_batches(x, B) for x in data], B)


def _flat(engine, tree):
    return [mesh_lib.to_host(x) for x in jax.tree.leaves(tree)]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def engine():
    e = _engine()
    e.init(len(SIZES))
    return e


def _run(engine, data, weights, participating=None, rounds=1):
    state = engine.init(len(SIZES))
    metrics = None
    for _ in range(rounds):
        state, metrics = engine.run_round(state, _batches(data), weights, participating)
    return state, jax.tree.map(mesh_lib.to_host, metrics)


def test_frozen_bit_identical_and_unseen_has_no_influence(engine, four_devices):
    data = tiny.make_client_data(SIZES, seed=3)
    w = aggregate.client_weights(SIZES, unseen=3)
    frozen_before = _flat(engine, engine.frozen)
    state, m = _run(engine, data, w, rounds=2)
    # a different dataset on the unseen site changes nothing
    data2 = list(data)
    data2[3] = tiny.make_client_data((2,), seed=99)[0]
    state2, _ = _run(engine, data2, w, rounds=2)
    assert _same(_flat(engine, state.global_params), _flat(engine, state2.global_params))
    assert not _same(_flat(engine, state.global_params), _flat(engine, engine.initial_trainable))
    # frozen leaves of the global model are the initial ones, bit for bit
    full = engine.global_params(state)
    init_state = jax.tree.leaves(nnx.state(_model(), nnx.Param))
    p = engine.partition
    for path, t, now, before in zip(p.paths, p.trainable, jax.tree.leaves(full), init_state):
        if not t:
            assert np.array_equal(mesh_lib.to_host(now), np.asarray(before)), path
    assert _same(_flat(engine, engine.frozen), frozen_before)
    assert not m["active"][3] and m["weight"][3] == 0 and m["steps"][3] == 0
    assert np.isclose(m["weight"].sum(), 1.0)


def test_failed_client_dropped_and_renormalised(engine, four_devices):
    data = tiny.make_client_data(SIZES, seed=4)
    bad = list(data)
    bad[1] = (np.full_like(data[1][0], NAN_PIXEL), data[1][1])
    w = aggregate.client_weights(SIZES)
    state, m = _run(engine, bad, w)
    assert list(m["finite"]) == [True, False, True, True]
    assert list(m["counted"]) == [True, False, True, True]
    # same as excluding client 1 up front
    w0 = w.copy()
    w0[1] = 0
    ref, mref = _run(engine, data, w0)
    got_g, ref_g = _flat(engine, state.global_params), _flat(engine, ref.global_params)
    assert all(np.all(np.isfinite(x)) for x in got_g)
    assert max(np.max(np.abs(a - b)) for a, b in zip(got_g, ref_g)) <= 1e-6
    np.testing.assert_allclose(m["weight"], mref["weight"], rtol=1e-6)
    assert m["weight"][1] == 0
    # the failed client keeps its pre-round optimizer state (fresh here), not NaNs
    assert all(np.all(np.isfinite(x)) for x in _flat(engine, state.client_opt_state))


def test_partial_participation(engine, four_devices):
    data = tiny.make_client_data(SIZES, seed=5)
    w = aggregate.client_weights(SIZES)
    part = aggregate.participation_mask(7, len(SIZES), num_sampled=2, seed=11)
    assert part.sum() == 2
    assert np.array_equal(part, aggregate.participation_mask(7, len(SIZES), num_sampled=2, seed=11))
    state, m = _run(engine, data, w, part)
    ref, _ = _run(engine, data, np.where(part, w, 0))
    assert _same(_flat(engine, state.global_params), _flat(engine, ref.global_params))
    assert np.array_equal(m["active"], part)
    # absent clients' optimizer state did not move (Adam count stays 0)
    counts = [x for x in _flat(engine, state.client_opt_state) if x.ndim == 1 and x.dtype == np.int32]
    assert counts and all(np.array_equal(c[:len(SIZES)] > 0, part) for c in counts)
    up = comm.round_comm(engine.partition, m)
    assert np.array_equal(up["upload"] > 0, part)
    assert up["upload_total"] == 2 * comm.comm_bytes(engine.partition)


def test_comm_only_nonzero_grad_drops_depth_adapters(engine, four_devices):
    data = tiny.make_client_data(SIZES, seed=6)
    _, m = _run(engine, data, aggregate.client_weights(SIZES))
    p = engine.partition
    lb = comm.trainable_leaf_bytes(p)
    depth = np.array(["Depth_Adapter" in q for q in p.trainable_paths])
    assert depth.any()
    assert not m["touched"][:, depth].any() and m["touched"][:, ~depth].all()
    r = comm.round_comm(p, m, only_nonzero_grad=True)
    expect = int(lb[~depth].sum())
    assert list(r["upload"]) == [expect] * len(SIZES)
    assert list(r["download"]) == [expect] * len(SIZES)
    assert comm.comm_bytes(p, True, m["touched"][0]) == expect < comm.comm_bytes(p)


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [("fedavgm", dict(lr=0.7, momentum=0.9)),
                                     ("fedadam", dict(lr=3e-3))])
def test_server_optimizer_on_pseudo_gradient(engine, name, kw, four_devices):
    data = tiny.make_client_data(SIZES, seed=8)
    w = aggregate.client_weights(SIZES)
    e = _engine(server_optimizer=server_optimizer(name, **kw))
    state = e.init(len(SIZES))
    tx = server_optimizer(name, **kw).tx
    g = jax.tree.map(mesh_lib.to_host, e.initial_trainable)
    ss = tx.init(g)
    avg_state = engine.init(len(SIZES))
    for r in range(2):
        batches = _batches([(i[::-1], m[::-1]) if r else (i, m) for i, m in data])
        # FedAvg engine started from the same global: its result is the weighted mean
        avg_state = avg_state._replace(global_params=jax.tree.map(
            lambda x: mesh_lib.to_global(x, mesh_lib.replicated(engine.mesh)), g))
        avg_state, _ = engine.run_round(avg_state, batches, w)
        mean = jax.tree.map(mesh_lib.to_host, avg_state.global_params)
        delta = jax.tree.map(lambda a, b: a - b, g, mean)
        upd, ss = tx.update(delta, ss, g)
        g = jax.tree.map(np.asarray, optax.apply_updates(g, upd))
        state, _ = e.run_round(state, batches, w)
    got = jax.tree.map(mesh_lib.to_host, state.global_params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not _same(jax.tree.leaves(got), jax.tree.leaves(mean))


@pytest.mark.slow
def test_fedprox_and_fresh_client_optimizer(four_devices):
    data = tiny.make_client_data(SIZES, seed=9)
    w = aggregate.client_weights(SIZES)
    plain = _engine(keep_client_opt_state=False, client_optimizer=optax.sgd(0.5))
    prox = _engine(keep_client_opt_state=False, client_optimizer=optax.sgd(0.5), prox_mu=1.0)
    moved = []
    for e in (plain, prox):
        state = e.init(len(SIZES))
        assert state.client_opt_state == ()
        state, m = e.run_round(state, _batches(data), w)
        g0 = jax.tree.leaves(e.initial_trainable)
        moved.append(sum(float(np.sum((mesh_lib.to_host(a) - np.asarray(b)) ** 2))
                         for a, b in zip(jax.tree.leaves(state.global_params), g0)))
    # the proximal pull towards the round's starting point shortens the step
    assert 0 < moved[1] < moved[0]


def test_client_finite_flags_nan_and_inf_but_not_large_values():
    big = np.finfo(np.float32).max
    leaf = np.ones((5, 3, 4), np.float32)
    leaf[0, 1, 2] = np.nan
    leaf[1, 2, 3] = np.inf
    leaf[2, 0, 0] = -np.inf
    leaf[3] = big  # finite, and would overflow a sum
    bias = np.zeros((5, 4), np.float32)
    loss = np.array([0.1, 0.2, 0.3, 0.4, np.nan], np.float32)
    ok = aggregate.client_finite({"w": jnp.asarray(leaf), "b": jnp.asarray(bias)}, jnp.asarray(loss))
    assert list(np.asarray(ok)) == [False, False, False, True, False]
