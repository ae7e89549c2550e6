"""One process of the two-process federated test (also importable for the single-process
run): 2 rounds of a tiny model, 4 clients over a mesh of all global devices.

python -m tests.federated.multihost_worker --process-id 0 --num-processes 2 --port P --out F
"""
from __future__ import annotations

import argparse
import os
import sys

SIZES = (3, 5, 2, 4)
ROUNDS = 2
B = 2


def run_two_rounds():
    """Returns {trainable path: np.ndarray} of the global model after ROUNDS rounds."""
    import jax
    import numpy as np
    import optax

    from fedfms_jax.federated import aggregate, mesh as mesh_lib
    from fedfms_jax.federated.round import FederatedEngine
    from tests.federated import tiny

    model = tiny.make_tiny_sam(0)
    engine = FederatedEngine(model, "fedmsa", forward=tiny.tiny_forward,
                             client_optimizer=optax.adam(1e-3), mesh=mesh_lib.client_mesh())
    data = tiny.make_client_data(SIZES, seed=2)
    w = aggregate.client_weights(SIZES)
    state = engine.init(len(SIZES))
    for r in range(ROUNDS):
        d = [(i[::-1], m[::-1]) if r % 2 else (i, m) for i, m in data]
        batches = tiny.pack([tiny.client_batches(x, B) for x in d], B)
        state, metrics = engine.run_round(state, batches, w)
    assert bool(np.all(mesh_lib.to_host(metrics["finite"])))
    leaves = engine.partition.flatten_trainable(state.global_params)
    return {p: mesh_lib.to_host(x) for p, x in zip(engine.partition.trainable_paths, leaves)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--local-devices", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from fedfms_jax.federated.mesh import init_distributed

    init_distributed(f"localhost:{a.port}", a.num_processes, a.process_id,
                     cpu_collectives="gloo", timeout_s=120)
    assert jax.device_count() == a.num_processes * a.local_devices, jax.devices()
    result = run_two_rounds()
    if a.process_id == 0:
        np.savez(a.out, **{k.replace("/", "|"): v for k, v in result.items()})
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
