"""A vmapped, client-sharded round equals a sequential per-client loop + parameter mean."""
import functools

import jax
import numpy as np
import optax
import pytest

from fedfms_jax.federated import aggregate, mesh as mesh_lib
from fedfms_jax.federated.round import FederatedEngine
from tests.federated import tiny

LR = 1e-3
B = 2


def _rel_err(got: dict, ref: dict) -> float:
    assert set(got) == set(ref)
    num = sum(float(np.sum((got[k].astype(np.float64) - ref[k]) ** 2)) for k in ref)
    den = sum(float(np.sum(ref[k].astype(np.float64) ** 2)) for k in ref)
    return (num / den) ** 0.5


def _max_leaf_rel_err(got, ref, floor_rms=1e-4):
    """Worst per-leaf relative error. A leaf whose RMS is below floor_rms (e.g. a zero-init
    attention key bias: its gradient is mathematically zero, so it holds only round-off
    noise) is measured against floor_rms instead of against its own noise."""
    return max(
        float(np.linalg.norm(got[k] - ref[k])
              / max(np.linalg.norm(ref[k]), floor_rms * np.sqrt(ref[k].size))) for k in ref
    )


def _flat_global(engine, state):
    p = engine.partition
    leaves = p.flatten_trainable(state.global_params)
    return {k: mesh_lib.to_host(v) for k, v in zip(p.trainable_paths, leaves)}


@functools.lru_cache(maxsize=None)
def _model():
    return tiny.make_tiny_sam(0)


def run_case(preset, sizes, num_devices, mode="epoch", rounds=2, steps=3, unseen=None,
             model=None, forward=tiny.tiny_forward, opt=("adam", LR), hw=16, **engine_kw):
    model = model if model is not None else _model()
    mesh = mesh_lib.client_mesh(jax.devices()[:num_devices])
    engine = FederatedEngine(model, preset, forward=forward,
                             client_optimizer=tiny.make_tx(opt), mesh=mesh, **engine_kw)
    data = tiny.make_client_data(sizes, hw=hw, seed=1)
    weights = aggregate.client_weights(sizes, unseen=unseen)
    per_round = []
    state = engine.init(len(sizes))
    for r in range(rounds):
        # different batches each round (reverse order on odd rounds)
        d = [(i[::-1], m[::-1]) if r % 2 else (i, m) for i, m in data]
        cb = [tiny.client_batches(x, B, steps if mode == "steps" else None) for x in d]
        per_round.append(cb)
        state, metrics = engine.run_round(state, tiny.pack(cb, B), weights)
        assert np.all(mesh_lib.to_host(metrics["finite"]))
    got = _flat_global(engine, state)
    ref = tiny.sequential_fedavg(model, engine.partition.trainable_paths, per_round, weights,
                                 rounds, opt=opt, forward=forward)
    init = {k: np.asarray(v) for k, v in zip(engine.partition.trainable_paths,
                                             engine.partition.flatten_trainable(engine.initial_trainable))}
    # the round must have moved the parameters, or the comparison says nothing
    assert _max_leaf_rel_err(init, ref) > 1e-3
    return got, ref, engine, state, metrics


# Pairwise covering of preset x {equal, unequal} sizes x {1, 4} devices x {3, 4} clients:
# every pair of factor values appears in some case (the full product costs 16 compiles).
CASES = [
    ("fedsam", (4, 4, 4), 1),
    ("fedsam", (5, 2, 3, 1), 4),
    ("fedsam", (3, 3, 3, 3), 4),
    ("fedmsa", (4, 4, 4), 4),
    ("fedmsa", (5, 2, 3, 1), 1),
    ("fedmsa", (3, 6, 1), 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("preset,sizes,num_devices", CASES,
                         ids=[f"{p}-{'x'.join(map(str, s))}-{d}dev" for p, s, d in CASES])
def test_vmapped_round_equals_sequential_loop(preset, sizes, num_devices, four_devices):
    got, ref, *_ = run_case(preset, sizes, num_devices)
    assert _rel_err(got, ref) <= 1e-5
    assert _max_leaf_rel_err(got, ref) <= 1e-5


@pytest.mark.slow
def test_fixed_local_steps_equals_sequential_loop(four_devices):
    got, ref, *_ = run_case("fedmsa", (5, 2, 3), 4, mode="steps", steps=4)
    assert _max_leaf_rel_err(got, ref) <= 1e-5


@functools.lru_cache(maxsize=None)
def _tiny_sam():
    from flax import nnx

    from fedfms_jax.models.sam import SamConfig, build_sam

    cfg = SamConfig(encoder="vit_tiny", image_size=32, adapters=True, prompt_free=True,
                    pixel_norm="unit")
    # Built eagerly: its per-shape initialiser programs come from the run's compilation
    # cache once any vit_tiny model was built; one jitted build would compile anew.
    return build_sam(cfg, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_client_chunks_and_no_kept_client_params(four_devices):
    # 4 clients on 1 device trained 3 at a time (a full chunk and a remainder)
    got, ref, engine, state, _ = run_case("fedmsa", (5, 2, 3, 1), 1, client_chunk=3,
                                          keep_client_params=False)
    assert state.client_params == ()
    assert _max_leaf_rel_err(got, ref) <= 1e-5


# SAM's attention has key biases, whose gradient is mathematically zero; Adam (eps 1e-8)
# would blow their round-off noise up to lr-sized steps, so these use SGD with momentum
# (client optimizer state still carried across rounds).
@pytest.mark.slow
@pytest.mark.parametrize("preset,sizes,num_devices", [("fedmsa", (4, 2, 6), 4),
                                                      ("fedsam", (2, 2, 2, 2), 1)])
def test_tiny_sam_round_equals_sequential_loop(preset, sizes, num_devices, four_devices):
    from fedfms_jax.federated.round import sam_forward

    got, ref, engine, *_ = run_case(preset, sizes, num_devices, model=_tiny_sam(),
                                    forward=sam_forward, opt=("sgdm", 0.05), hw=32)
    if preset == "fedmsa":
        assert any("Space_Adapter" in p for p in engine.partition.trainable_paths)
        assert "image_encoder/blocks/0/attn/qkv/kernel" in engine.partition.frozen_paths
    assert _rel_err(got, ref) <= 1e-5
    assert _max_leaf_rel_err(got, ref) <= 1e-5


@pytest.mark.slow
def test_training_without_aggregation_equals_each_client_alone(four_devices):
    """aggregate_clients=False (the "local" mode): every client goes on from its own
    params of the last round, as if trained alone; the global model stays as it was."""
    model, sizes, rounds = _model(), (5, 2, 3), 2
    engine = FederatedEngine(model, "fedmsa", forward=tiny.tiny_forward, client_optimizer=tiny.make_tx(("adam", LR)),
                             mesh=mesh_lib.client_mesh(jax.devices()[:4]), aggregate_clients=False)
    data = tiny.make_client_data(sizes, hw=16, seed=1)
    state, per_round = engine.init(len(sizes)), []
    for r in range(rounds):
        cb = [tiny.client_batches((i[::-1], m[::-1]) if r % 2 else (i, m), B) for i, m in data]
        per_round.append(cb)
        state, metrics = engine.run_round(state, tiny.pack(cb, B), aggregate.client_weights(sizes))
        assert np.all(mesh_lib.to_host(metrics["finite"]))
    p = engine.partition
    init = {k: np.asarray(v) for k, v in zip(p.trainable_paths, p.flatten_trainable(engine.initial_trainable))}
    glob = _flat_global(engine, state)
    assert all(np.array_equal(glob[k], init[k]) for k in init)
    for c in range(len(sizes)):
        got = {k: mesh_lib.to_host(v)[c] for k, v in zip(p.trainable_paths, p.flatten_trainable(state.client_params))}
        alone = tiny.sequential_fedavg(model, p.trainable_paths, [[cb[c]] for cb in per_round], [1.0], rounds,
                                       opt=("adam", LR))
        assert _max_leaf_rel_err(init, alone) > 1e-3
        assert _max_leaf_rel_err(got, alone) <= 1e-5
