"""Benchmark configuration: one federated round (or the image encoder alone), JAX vs the
PyTorch original.

    python -m fedfms_jax.benchmark --config configs/benchmark.py
    python -m fedfms_jax.benchmark --config configs/benchmark.py:method=fedsam
    python -m fedfms_jax.benchmark --config configs/benchmark.py:variant=vit_b,image_size=1024,clients=4,batch=4,steps=2,dtype=bfloat16
    python -m fedfms_jax.benchmark --config configs/benchmark.py:mode=encoder,image_size=256
    python -m fedfms_jax.benchmark --config configs/benchmark.py:mode=ops,method=fedsam   # per-op profile

The default is the CPU target: ViT-B at 256, FedMSA, 4 clients x batch 2, 2 local steps.
"""
from __future__ import annotations

try:
    from ml_collections import ConfigDict
except ImportError:  # e.g. a bare GPU image: the few ConfigDict features used here

    class ConfigDict(dict):
        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError:
                raise AttributeError(key) from None

        def __setattr__(self, key, value):
            self[key] = value

        def to_dict(self) -> dict:
            return dict(self)


def get_config(arg: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.mode = "round"          # round: one federated round | encoder: image-encoder forward only
                              # | profile: one local step part by part (JAX beside PyTorch)
                              # | ops: the JAX round under XLA's per-op trace, time by op kind
    c.variant = "vit_b"       # SAM image encoder (vit_tiny for tests)
    c.image_size = 256
    c.clients = 4
    c.batch = 2               # images per client per local step
    c.steps = 2               # local steps per round
    c.method = "fedmsa"       # fedmsa | fedsam
    c.num_classes = 1
    c.prompt_free = True
    c.dtype = "auto"          # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    c.client_chunk = -1       # -1: 1 on a CPU (measured faster there), 0 elsewhere | 0: all
                              # clients of a device vmapped at once | n: n at a time (lax.map)
    c.remat = False           # rematerialise encoder blocks to fit larger batches
    c.scan_blocks = False     # compile one period of the ViT's repeating blocks and scan over it
    c.warmup = 1              # untimed rounds after compilation
    c.repeats = 3             # timed rounds; median and spread are reported
    c.eval = True             # also time evaluation (forward only) images/s
    c.torch = True            # run the PyTorch original-style reference too
    c.torch_repeats = -1      # -1: same as repeats
    c.persistent_clients = True  # the original: each client keeps its Adam state across rounds
                              # (PyTorch: one model + Adam per client); false: fresh each round
    c.processes = "separate"  # round mode: separate (JAX, then PyTorch, each in its own fresh
                              # process) | same (both in this process: PyTorch's thread pools
                              # and heap slow XLA; how figures before 2026-12-03 were taken)
    c.interleave = True       # in one process: alternate JAX and PyTorch repetitions
    c.threads = 0             # CPU threads for torch (0: all cores, like XLA)
    c.flops = "xla"           # xla: XLA cost analysis of one compiled local step | jaxpr: count
                              # matmul/conv FLOPs from the traced program (no extra compile)
    c.peak = "auto"           # auto: table for known GPUs, measured matmul otherwise | table | measure
    c.top = 15                # ops mode: how many single ops to list, slowest first
    c.seed = 0
    if arg:
        _apply_overrides(c, arg)
    if c.method not in ("fedmsa", "fedsam"):
        raise ValueError(f"method must be fedmsa or fedsam, got {c.method!r}")
    if c.flops not in ("xla", "jaxpr"):
        raise ValueError(f"flops must be xla or jaxpr, got {c.flops!r}")
    if c.processes not in ("separate", "same"):
        raise ValueError(f"processes must be separate or same, got {c.processes!r}")
    if c.mode not in ("round", "encoder", "profile", "ops"):
        raise ValueError(f"mode must be round, encoder, profile or ops, got {c.mode!r}")
    return c


def _apply_overrides(c: ConfigDict, arg: str) -> None:
    """Apply "k=v,k=v" with each value cast to the type of the default."""
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"config argument {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in c:
            raise KeyError(f"unknown benchmark config key {key!r}; known: {sorted(c.keys())}")
        default = c[key]
        if isinstance(default, bool):
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"{key} expects a boolean, got {value!r}")
            c[key] = low in ("1", "true", "yes")
        elif isinstance(default, int):
            c[key] = int(value)
        elif isinstance(default, float):
            c[key] = float(value)
        else:
            c[key] = value
