"""compute_dtype casts the frozen kernels once per round: the same loss, bit for bit."""
import jax
import numpy as np
from flax import nnx

from fedfms_jax.federated.client import make_loss_fn
from fedfms_jax.federated.round import FederatedEngine
from fedfms_jax.models import sam


def test_precast_frozen_kernels_change_nothing():
    cfg = sam.SamConfig(encoder="vit_tiny", image_size=160, adapters=True, prompt_free=True,
                        pixel_norm="unit", pad_before_norm1=True, dtype="bfloat16")
    engine = FederatedEngine(sam.build_sam(cfg, rngs=nnx.Rngs(0)), "fedmsa", compute_dtype="bfloat16")
    cast = engine._frozen_for_compute(engine.frozen)
    kernels = [x for p, x in jax.tree.leaves_with_path(cast) if getattr(p[-1], "key", None) == "kernel"]
    assert kernels and all(x.dtype == np.dtype("bfloat16") for x in kernels)
    others = [x for p, x in jax.tree.leaves_with_path(cast) if getattr(p[-1], "key", None) != "kernel"]
    assert others and all(x.dtype == np.float32 for x in others)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(engine.frozen))  # stored tree untouched

    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 255, (2, 160, 160, 3), dtype=np.uint8),
             "mask": rng.integers(0, 2, (2, 40, 40, 1), dtype=np.uint8), "valid": np.ones((2,), bool)}
    loss_fn = jax.jit(make_loss_fn(engine.graphdef, engine.partition, engine.forward, engine.loss))
    tr = engine.initial_trainable
    got = loss_fn(tr, cast, engine.rest, tr, batch)
    ref = loss_fn(tr, engine.frozen, engine.rest, tr, batch)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
