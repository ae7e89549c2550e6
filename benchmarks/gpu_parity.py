"""Forward parity of the gpu kernel plan against the reference plan, and whether the
compiled gpu forward uses cuDNN's fused attention.

    python benchmarks/gpu_parity.py --json parity.json [--encoder vit_b --image-size 1024]

One set of random weights (relative-position tables and adapters made non-zero so that
every term counts) in two models: kernels=gpu on the default device, in float32 and in
bfloat16, and kernels=reference in float32 on the CPU (`--reference-device cpu`, the
default) or on the default device. Relative error of the low-resolution logits:
float32 <= 1e-4 (matmuls at HIGHEST precision, so no TF32), bfloat16 <= 1e-2. Exit 1
when a bound is missed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.models.sam import SamConfig, build_sam, preprocess

BOUNDS = {"float32": 1e-4, "bfloat16": 1e-2}
CUDNN_FMHA = "__cudnn$fmha"


def _model(encoder, size, kernels, dtype, seed):
    cfg = SamConfig(encoder=encoder, image_size=size, adapters=True, prompt_free=True, pixel_norm="unit",
                    dtype=dtype, kernels=kernels)
    return build_sam(cfg, rngs=nnx.Rngs(seed))


def _randomise(state, seed):
    """Non-zero rel_pos tables and adapter up-projections (zeros at init would hide them).
    Each leaf's key comes from a stable hash of its path: Python's hash() of a string
    changes from process to process, and so did the weights (and the bf16 error)."""
    key = jax.random.key(seed + 1)

    def leaf(path, x):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if "rel_pos" in name or ("Adapter" in name and "kernel" in name):
            return 0.05 * jax.random.normal(jax.random.fold_in(key, zlib.crc32(name.encode())), x.shape, x.dtype)
        return x

    return jax.tree.map_with_path(leaf, state)


def _forward(model, images, device):
    graph, state = nnx.split(model)
    state = jax.device_put(state, device)
    # Committed inputs: the program runs on `device`.
    fn = jax.jit(lambda s, x: nnx.merge(graph, s)(preprocess(x, "unit"))[0])
    x = jax.device_put(images, device)
    t0 = time.time()
    lowered = fn.lower(state, x)
    compiled = lowered.compile()
    out = np.asarray(compiled(state, x), np.float64)
    return out, compiled.as_text() or "", time.time() - t0


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run(encoder="vit_b", image_size=1024, batch=1, reference_device="cpu", seed=0) -> dict:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    ref_dev = jax.devices("cpu")[0] if reference_device == "cpu" else jax.devices()[0]
    with jax.default_matmul_precision("highest"):
        ref = _model(encoder, image_size, "reference", "float32", seed)
        weights = _randomise(nnx.state(ref), seed)
        nnx.update(ref, weights)
        want, _, ref_s = _forward(ref, images, ref_dev)
    result = {"encoder": encoder, "image_size": image_size, "batch": batch,
              "reference": {"kernels": "reference", "dtype": "float32", "device": str(ref_dev),
                            "seconds": round(ref_s, 1)},
              "device": str(jax.devices()[0]), "checks": {}}
    ok = True
    for dtype, bound in BOUNDS.items():
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
            gpu = _model(encoder, image_size, "gpu", dtype, seed)
            nnx.update(gpu, weights)
            got, hlo, seconds = _forward(gpu, images, jax.devices()[0])
        err = _rel_err(got, want)
        ok &= err <= bound
        result["checks"][dtype] = {
            "rel_err": err, "bound": bound, "ok": err <= bound, "seconds": round(seconds, 1),
            "plan_fused_impl": gpu.kernels.fused_impl,
            "cudnn_fused_attention_calls": hlo.count(CUDNN_FMHA),
        }
    result["ok"] = bool(ok)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="vit_b")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reference-device", choices=("cpu", "same"), default="cpu")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    r = run(a.encoder, a.image_size, a.batch, a.reference_device)
    text = json.dumps(r, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
