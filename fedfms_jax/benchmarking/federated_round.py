"""Round mode: one federated round of the JAX engine beside the PyTorch original-style
round on the same shapes, with every figure the report needs.

Each side can run alone (`run_jax_side`, `run_torch_side`) so that `benchmark` times them in
separate processes: with PyTorch in the JAX process, its thread pools and heap measurably
slow XLA (a FedMSA round at 256 ran at 0.786 instead of 1.096 img/s). `run_round` keeps the
older in-process way (`processes="same"`): with `interleave` the repetitions alternate JAX,
PyTorch, JAX, ...; otherwise JAX runs (and is freed) before PyTorch is built.
"""
from __future__ import annotations

import gc

import numpy as np

from fedfms_jax.benchmarking.stats import time_alternating


def synthetic_round(cfg) -> dict[str, np.ndarray]:
    """Host batches [steps, clients, B, ...]: uint8 images, binary low-res masks, all valid."""
    rng = np.random.default_rng(cfg.seed)
    s, c, b, n = cfg.steps, cfg.clients, cfg.batch, cfg.image_size
    return {
        "image": rng.integers(0, 256, (s, c, b, n, n, 3), dtype=np.uint8),
        "mask": (rng.random((s, c, b, n // 4, n // 4, cfg.num_classes)) < 0.3).astype(np.uint8),
        "valid": np.ones((s, c, b), bool),
    }


def _round_weights(cfg) -> np.ndarray:
    return np.full(cfg.clients, 1.0 / cfg.clients, np.float32)


def _torch_repeats(cfg) -> int:
    return cfg.repeats if cfg.torch_repeats < 0 else cfg.torch_repeats


def _jax_figures(cfg, jr, timing) -> dict:
    from fedfms_jax.benchmarking import flops as flops_lib
    from fedfms_jax.benchmarking.encoder import compute_dtype

    import jax

    j = jr.results(timing)
    j["backend"] = jax.default_backend()
    j["achieved_flops"] = j["flops_per_image"] * j["images_per_s"]
    j["peak_flops"], j["peak_source"] = flops_lib.device_peak(compute_dtype(cfg.dtype)[0], cfg.peak)
    j["mfu"] = j["achieved_flops"] / j["peak_flops"]
    return j


def build_jax_round(cfg):
    """The JAX engine's round for the config, compiled and ready to run (a JaxRound)."""
    from fedfms_jax.benchmarking.encoder import compute_dtype
    from fedfms_jax.benchmarking.jax_side import JaxRound

    return JaxRound(cfg, compute_dtype(cfg.dtype)[0], synthetic_round(cfg), _round_weights(cfg))


def run_jax_side(cfg) -> dict:
    """The JAX engine's round alone (no PyTorch in this process)."""
    jr = build_jax_round(cfg)
    (jt,) = time_alternating([jr.run], warmup=cfg.warmup, repeats=[cfg.repeats], interleave=False)
    return _jax_figures(cfg, jr, jt)


def run_torch_side(cfg) -> dict:
    """The PyTorch original-style round alone (JAX imported, never run, in this process)."""
    from fedfms_jax.benchmarking.torch_side import TorchRound, torch_matmul_flops

    tr = TorchRound(cfg, synthetic_round(cfg), _round_weights(cfg))
    (tt,) = time_alternating([tr.run], warmup=max(cfg.warmup, 1), repeats=[_torch_repeats(cfg)],
                             interleave=False)
    t = tr.results(tt)
    t["matmul_peak_flops"] = torch_matmul_flops(tr.device)
    return t


def combine(cfg, j: dict, t: dict | None) -> dict:
    """The round-mode result from each side's figures (t is None without PyTorch)."""
    if t is not None:
        # Same model, same function: the model FLOPs per image are the same; both sides'
        # MFU against the same peak (the JAX side's measured or datasheet figure).
        t["achieved_flops"] = j["flops_per_image"] * t["images_per_s"]
        t["mfu"] = t["achieved_flops"] / j["peak_flops"]
        # ... and against PyTorch's own matmul rate, the fairer bound for its fp32 kernels.
        own = t.get("matmul_peak_flops")
        t["mfu_own_peak"] = t["achieved_flops"] / own if own else None
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
        "torch_mfu": None if t is None else t["mfu"],
        "comm_bytes_per_round": j["comm_bytes_per_round"],
        "backend": j["backend"],
    }


def run_round(cfg) -> dict:
    """Both sides in this process (`processes="same"`), or JAX alone without PyTorch."""
    if not cfg.torch:
        return combine(cfg, run_jax_side(cfg), None)
    from fedfms_jax.benchmarking.encoder import compute_dtype
    from fedfms_jax.benchmarking.jax_side import JaxRound
    from fedfms_jax.benchmarking.torch_side import TorchRound, torch_matmul_flops

    if not cfg.interleave:
        j = run_jax_side(cfg)
        gc.collect()
        return combine(cfg, j, run_torch_side(cfg))
    batches, weights = synthetic_round(cfg), _round_weights(cfg)
    jr = JaxRound(cfg, compute_dtype(cfg.dtype)[0], batches, weights)
    tr = TorchRound(cfg, batches, weights)
    jt, tt = time_alternating([jr.run, tr.run], warmup=cfg.warmup, repeats=[cfg.repeats, _torch_repeats(cfg)],
                              interleave=True)
    t = tr.results(tt)
    t["matmul_peak_flops"] = torch_matmul_flops(tr.device)
    return combine(cfg, _jax_figures(cfg, jr, jt), t)
