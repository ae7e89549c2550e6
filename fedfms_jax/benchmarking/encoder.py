"""Image-encoder forward only: jitted JAX vs the official PyTorch ImageEncoderViT.

Same variant, input size, batch and thread count on both sides; random weights (speed
does not depend on their values). Also reports the JAX compile time of the forward.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.benchmarking import flops as flops_lib
from fedfms_jax.benchmarking.stats import Stopwatch, time_alternating
from fedfms_jax.models.image_encoder import VIT_CONFIGS, ImageEncoderViT


def compute_dtype(name: str):
    if name == "auto":
        name = "bfloat16" if jax.devices()[0].platform == "gpu" else "float32"
    return name, (jnp.bfloat16 if name == "bfloat16" else jnp.float32)


def jax_encoder(cfg) -> dict:
    dtype_name, dtype = compute_dtype(cfg.dtype)
    model = ImageEncoderViT(VIT_CONFIGS[cfg.variant], cfg.image_size, dtype=dtype,
                            rngs=nnx.Rngs(cfg.seed))
    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)

    rng = np.random.default_rng(cfg.seed)
    images = jnp.asarray(rng.random((cfg.batch, cfg.image_size, cfg.image_size, 3), np.float32))
    with Stopwatch() as sw:
        compiled = jax.jit(forward).lower(state, images).compile()
    cost = flops_lib.xla_cost(compiled)
    flops = cost["flops"] if cost else flops_lib.jaxpr_flops(forward, state, images)
    run = lambda: compiled(state, images).block_until_ready()  # noqa: E731
    return run, {
        "dtype": dtype_name,
        "compile_s": sw.seconds,
        "flops_per_image": flops / cfg.batch,
        "flops_source": "xla_cost_analysis" if cost else "jaxpr",
        "matmul_flops_per_image": flops_lib.jaxpr_flops(forward, state, images) / cfg.batch,
    }


def torch_encoder(cfg) -> dict:
    import torch

    from fedfms_jax.reference.torch_fedfms_decoder import TORCH_VIT_SETTINGS, build_torch_vit

    threads = cfg.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    model = build_torch_vit(img_size=cfg.image_size, **TORCH_VIT_SETTINGS[cfg.variant]).to(device).eval()
    images = torch.rand(cfg.batch, 3, cfg.image_size, cfg.image_size, device=device)

    def run():
        with torch.no_grad():
            model(images)
        if device == "cuda":
            torch.cuda.synchronize()

    return run, {"threads": threads, "device": device}


def run_encoder(cfg) -> dict:
    if cfg.variant not in VIT_CONFIGS:
        raise ValueError(f"unknown variant {cfg.variant!r}")
    if cfg.torch and cfg.variant == "vit_tiny":
        raise ValueError("vit_tiny has no official PyTorch counterpart; use torch=false")
    runs, parts = [], []
    for build in (jax_encoder, torch_encoder) if cfg.torch else (jax_encoder,):
        run, info = build(cfg)
        runs.append(run)
        parts.append(info)
    torch_repeats = cfg.repeats if cfg.torch_repeats < 0 else cfg.torch_repeats
    timings = time_alternating(runs, warmup=max(cfg.warmup, 1),
                               repeats=[cfg.repeats, torch_repeats][: len(runs)],
                               interleave=cfg.interleave)
    for info, timing in zip(parts, timings):
        info["timing"] = timing.as_dict()
        info["images_per_s"] = cfg.batch / timing.median
    out = {"mode": "encoder", "jax": parts[0], "torch": parts[1] if cfg.torch else None}
    out["jax_images_per_s"] = parts[0]["images_per_s"]
    out["compile_s"] = parts[0]["compile_s"]
    out["flops_per_image"] = parts[0]["flops_per_image"]
    out["torch_images_per_s"] = parts[1]["images_per_s"] if cfg.torch else None
    out["speedup"] = out["jax_images_per_s"] / out["torch_images_per_s"] if cfg.torch else None
    return out
