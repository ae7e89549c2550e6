"""Round mode: one federated round of the JAX engine beside the PyTorch original-style
round on the same shapes, with every figure the report needs.

With `interleave` the timed repetitions alternate JAX, PyTorch, JAX, ... so that both
see the same background load on a shared machine; otherwise JAX runs (and is freed)
before PyTorch is built, which halves peak host memory (use it for FedSAM).
"""
from __future__ import annotations

import gc

import jax
import numpy as np

from fedfms_jax.benchmarking import flops as flops_lib
from fedfms_jax.benchmarking.encoder import compute_dtype
from fedfms_jax.benchmarking.stats import Timing, time_alternating


def synthetic_round(cfg) -> dict[str, np.ndarray]:
    """Host batches [steps, clients, B, ...]: uint8 images, binary low-res masks, all valid."""
    rng = np.random.default_rng(cfg.seed)
    s, c, b, n = cfg.steps, cfg.clients, cfg.batch, cfg.image_size
    return {
        "image": rng.integers(0, 256, (s, c, b, n, n, 3), dtype=np.uint8),
        "mask": (rng.random((s, c, b, n // 4, n // 4, cfg.num_classes)) < 0.3).astype(np.uint8),
        "valid": np.ones((s, c, b), bool),
    }


def _time_sides(sides: list, warmup: int, repeats: list[int], interleave: bool) -> list[Timing]:
    return time_alternating([side.run for side in sides], warmup=warmup, repeats=repeats,
                            interleave=interleave)


def run_round(cfg) -> dict:
    from fedfms_jax.benchmarking.jax_side import JaxRound

    dtype_name, _ = compute_dtype(cfg.dtype)
    batches = synthetic_round(cfg)
    weights = np.full(cfg.clients, 1.0 / cfg.clients, np.float32)
    torch_repeats = cfg.repeats if cfg.torch_repeats < 0 else cfg.torch_repeats
    peak, peak_source = flops_lib.device_peak(dtype_name, cfg.peak)

    jr = JaxRound(cfg, dtype_name, batches, weights)
    t = None
    if cfg.torch and cfg.interleave:
        from fedfms_jax.benchmarking.torch_side import TorchRound

        tr = TorchRound(cfg, batches, weights)
        jt, tt = _time_sides([jr, tr], cfg.warmup, [cfg.repeats, torch_repeats], True)
        j, t = jr.results(jt), tr.results(tt)
        del tr
    else:
        (jt,) = _time_sides([jr], cfg.warmup, [cfg.repeats], False)
        j = jr.results(jt)
    del jr
    gc.collect()
    if cfg.torch and not cfg.interleave:
        from fedfms_jax.benchmarking.torch_side import TorchRound

        tr = TorchRound(cfg, batches, weights)
        (tt,) = _time_sides([tr], max(cfg.warmup, 1), [torch_repeats], False)
        t = tr.results(tt)
        del tr
        gc.collect()

    j["achieved_flops"] = j["flops_per_image"] * j["images_per_s"]
    j["peak_flops"], j["peak_source"] = peak, peak_source
    j["mfu"] = j["achieved_flops"] / peak
    if t is not None:
        # Same model, same function: the model FLOPs per image are the same.
        t["achieved_flops"] = j["flops_per_image"] * t["images_per_s"]
    return {
        "mode": "round",
        "images_per_round": cfg.steps * cfg.clients * cfg.batch,
        "jax": j,
        "torch": t,
        "jax_images_per_s": j["images_per_s"],
        "torch_images_per_s": None if t is None else t["images_per_s"],
        "speedup": None if t is None else j["images_per_s"] / t["images_per_s"],
        "compile_s": j["compile_s"],
        "step_s_median": j["step_s"],
        "peak_memory_bytes": j["peak_memory_bytes"],
        "flops_per_image": j["flops_per_image"],
        "mfu": j["mfu"],
        "comm_bytes_per_round": j["comm_bytes_per_round"],
        "backend": jax.default_backend(),
    }
