"""Device memory of one federated round, from the compiled step's memory analysis.

Lowers and compiles one round for abstract inputs (jax.ShapeDtypeStruct; nothing is
allocated) and checks that the frozen weights are counted once in the arguments, not once
per client.

python -m fedfms_jax.federated.memory_report --encoder vit_b --preset fedmsa \
    --image-size 1024 --clients 6 --batch 4 --steps 1 [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

from fedfms_jax.federated.round import FederatedEngine


def _tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def peak_bytes(ma) -> int:
    """Peak device memory of a compiled program from its memory analysis: arguments +
    outputs - aliased (donated inputs reused as outputs) + temporaries."""
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
               + ma.temp_size_in_bytes)


def round_memory(engine: FederatedEngine, clients: int, steps: int, batch: int, image_hw, mask_hwc) -> dict:
    """Memory analysis of `engine`'s round compiled for abstract inputs on its mesh."""
    t0 = time.time()
    ma = engine.lower_round(clients, steps, batch, image_hw, mask_hwc).compile().memory_analysis()
    return {"argument_bytes": int(ma.argument_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
            "alias_bytes": int(ma.alias_size_in_bytes), "temp_bytes": int(ma.temp_size_in_bytes),
            "peak_bytes": peak_bytes(ma), "compile_s": round(time.time() - t0, 1),
            "backend": jax.default_backend()}


def analyse(encoder="vit_b", preset="fedmsa", image_size=1024, clients=6, batch=4, steps=1,
            dtype="float32", client_chunk=None) -> dict:
    from fedfms_jax.models.sam import SamConfig, build_sam

    cfg = SamConfig(encoder=encoder, image_size=image_size, adapters=(preset == "fedmsa"),
                    prompt_free=True, pixel_norm="unit", dtype=dtype)
    model = nnx.eval_shape(lambda: build_sam(cfg, rngs=nnx.Rngs(0)))
    engine = FederatedEngine(model, preset, client_optimizer=optax.adam(1e-4), client_chunk=client_chunk,
                             compute_dtype=dtype, mesh=jax.make_mesh((1,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,),
                                                devices=jax.devices()[:1]))
    t0 = time.time()
    lowered = engine.lower_round(clients, steps, batch, (image_size, image_size),
                                 (image_size // 4, image_size // 4, cfg.num_classes))
    compiled = lowered.compile()
    compile_s = time.time() - t0
    ma = compiled.memory_analysis()
    print(f"compiled in {compile_s:.0f} s: {ma}", flush=True)
    state = engine.init(clients)
    frozen_b = _tree_bytes(engine.frozen)
    state_b = _tree_bytes(state)
    c = engine.num_padded
    batch_b = c * steps * batch * (image_size * image_size * 3 + (image_size // 4) ** 2 * cfg.num_classes + 1)
    other_b = _tree_bytes(engine.rest) + c * 5
    args = int(ma.argument_size_in_bytes)
    # A round never reads state.client_params (each client starts from the global
    # model): when kept, jit drops that input and it is not among the arguments.
    expected_once = state_b - _tree_bytes(state.client_params) + frozen_b + batch_b + other_b
    return {
        "encoder": encoder, "preset": preset, "image_size": image_size, "clients": clients,
        "batch": batch, "local_steps": steps, "dtype": dtype,
        "trainable_params": engine.partition.count(True), "frozen_params": engine.partition.count(False),
        "argument_bytes": args, "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes), "temp_bytes": int(ma.temp_size_in_bytes),
        "generated_code_bytes": int(ma.generated_code_size_in_bytes),
        "state_bytes": state_b, "frozen_bytes": frozen_b, "batch_bytes": batch_b,
        "expected_args_frozen_once": expected_once,
        "expected_args_frozen_per_client": expected_once + (clients - 1) * frozen_b,
        "frozen_once": abs(args - expected_once) < frozen_b // 2,
        "client_chunk": client_chunk or clients,
        "peak_estimate_bytes": peak_bytes(ma),
        "compile_s": round(compile_s, 1),
        "backend": jax.default_backend(), "jax": jax.__version__,
    }


def _gib(b):
    return f"{b / 2**30:.3f} GiB"


def markdown(r: dict, command: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "",
        "## Federated round memory",
        "",
        f"One round of {r['encoder']} {r['preset']} at {r['image_size']}x{r['image_size']}, "
        f"{r['clients']} clients x batch {r['batch']} ({r['client_chunk']} client(s) trained at once), "
        f"{r['local_steps']} local step(s), Adam, FedAvg, "
        f"{r['dtype']}; compiled for one {r['backend']} device (jax {r['jax']}), from "
        "`compiled.memory_analysis()` of the jitted round on abstract inputs (nothing allocated). "
        f"Measured {date}, host {platform.node() or 'n/a'}.",
        "",
        f"Command: `{command}`",
        "",
        "| quantity | bytes | |",
        "|---|---:|---|",
        f"| arguments (state + frozen + batch) | "
        f"{r['argument_bytes']:,} | {_gib(r['argument_bytes'])} |",
        f"| outputs | {r['output_bytes']:,} | {_gib(r['output_bytes'])} |",
        f"| aliased (donated state reused for outputs) | {r['alias_bytes']:,} | {_gib(r['alias_bytes'])} |",
        f"| temporaries (activations, gradients) | {r['temp_bytes']:,} | {_gib(r['temp_bytes'])} |",
        f"| peak estimate (args + outputs - aliased + temps) | {r['peak_estimate_bytes']:,} | "
        f"{_gib(r['peak_estimate_bytes'])} |",
        f"| federated state (global + {r['clients']} x Adam m, v + server) | {r['state_bytes']:,} | "
        f"{_gib(r['state_bytes'])} |",
        f"| frozen weights ({r['frozen_params']:,} params) | {r['frozen_bytes']:,} | {_gib(r['frozen_bytes'])} |",
        f"| expected arguments, frozen once | {r['expected_args_frozen_once']:,} | |",
        f"| expected arguments, frozen per client | {r['expected_args_frozen_per_client']:,} | |",
        "",
        f"Frozen weights counted once: **{r['frozen_once']}** (trainable {r['trainable_params']:,} "
        f"params per client). Compile time {r['compile_s']} s.",
        "",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="vit_b")
    ap.add_argument("--preset", default="fedmsa")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--client-chunk", type=int, default=None,
                    help="clients trained at once per device (default: all)")
    ap.add_argument("--markdown", help="append a '## Federated round memory' section to this file")
    a = ap.parse_args(argv)
    r = analyse(a.encoder, a.preset, a.image_size, a.clients, a.batch, a.steps, a.dtype, a.client_chunk)
    print(json.dumps(r, indent=1))
    if a.markdown:
        cmd = "python -m fedfms_jax.federated.memory_report " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "markdown" and v is not None)
        with open(a.markdown, "a") as f:
            f.write(markdown(r, cmd))
    return 0 if r["frozen_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
