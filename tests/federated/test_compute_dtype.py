"""compute_dtype casts the frozen kernels once per round: the same round, bit for bit."""
import jax
import numpy as np
import optax
from flax import nnx

from fedfms_jax.federated.round import FederatedEngine
from fedfms_jax.models import sam


def _round(compute_dtype):
    cfg = sam.SamConfig(encoder="vit_tiny", image_size=160, adapters=True, prompt_free=True,
                        pixel_norm="unit", pad_before_norm1=True, dtype="bfloat16")
    model = sam.build_sam(cfg, rngs=nnx.Rngs(0))
    engine = FederatedEngine(model, "fedmsa", client_optimizer=optax.adam(1e-3), compute_dtype=compute_dtype)
    state = engine.init(4)
    rng = np.random.default_rng(0)
    batches = {"image": rng.integers(0, 255, (1, 4, 2, 160, 160, 3), dtype=np.uint8),
               "mask": rng.integers(0, 2, (1, 4, 2, 40, 40, 1), dtype=np.uint8),
               "valid": np.ones((1, 4, 2), bool)}
    state, metrics = engine.run_round(state, batches, np.full(4, 0.25, np.float32))
    return engine, jax.device_get(state.global_params), jax.device_get(metrics["loss"])


def test_precast_frozen_kernels_change_nothing():
    engine, params, loss = _round("bfloat16")
    _, ref_params, ref_loss = _round("float32")
    cast = engine._frozen_for_compute(engine.frozen)
    kernels = [x for p, x in jax.tree.leaves_with_path(cast) if getattr(p[-1], "key", None) == "kernel"]
    assert kernels and all(x.dtype == np.dtype("bfloat16") for x in kernels)
    assert jax.tree.leaves(engine.frozen)[0].dtype == np.float32  # the stored tree stays float32
    np.testing.assert_array_equal(loss, ref_loss)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(a, b)
