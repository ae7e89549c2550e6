r"""Memory plan: the fastest round settings of a training config that fit each device.

    python -m fedfms_jax.plan --config prostate:method=fedsam --memory-gb 80 [--devices 4] \
        [--steps N] [--config.x=v ...]

For the config as given, the round program is compiled for abstract weights (nothing big
is allocated) with each candidate setting, fastest first, and XLA's memory analysis of it
gives the per-device peak: arguments + outputs - aliased (donated) + temporaries. The
first candidate that fits is printed as `--config.x=` overrides (exit 0); when none
fits, one line says what does not fit and the smallest change that would (exit 2).

Candidates, fastest first (bf16 compute with float32 master weights in each):
  1. every client of a device at once (client_loop=vmap), no remat
  2. one client at a time (client_loop=sequential): one client of batch 4 at 1024
     already fills a GPU, so this costs little
  3. all at once with remat (recompute each encoder block in the backward pass: about a
     third more encoder work)
  4. one at a time with remat
The order is an estimate (not timed here); the memory is measured.

Devices: the round shards clients over D devices, so a device holds ceil(C / D) clients;
each device's program is compiled as a one-device round with that many clients (the same
per-device arrays; the collectives of the server step are left out, a few trainable-sized
buffers). The backend is this machine's: on a CPU plan for a GPU with
`--config.model.kernels=gpu` (XLA:CPU then materialises the attention scores that cuDNN's
fused kernel keeps on chip, so its figure is an upper bound for the GPU's). Each compile of
ViT-B at 1024 takes minutes on a small CPU.
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import jax
import ml_collections
from flax import nnx

from fedfms_jax import config_cli, model_init, run_config, run_state
from fedfms_jax.cli_errors import UsageError, run_cli
from fedfms_jax.data.registry import federation_info
from fedfms_jax.federated import mesh as mesh_lib
from fedfms_jax.federated.memory_report import round_memory
from fedfms_jax.models.sam import build_sam

FLAGS = {
    "config": ("NAME|FILE[:ARGS]", "the training config to plan for (as train takes it)"),
    "memory-gb": ("N", "memory of one device in GB (10^9 bytes)"),
    "devices": ("D", "devices the clients are sharded over (default: this machine's)"),
    "steps": ("T", "local steps whose images a round holds (default: local_steps, else 1)"),
}
GB = 1e9
# (client_loop, remat), fastest first; see the module docstring.
CANDIDATES = (("vmap", False), ("sequential", False), ("vmap", True), ("sequential", True))
PLAN_DTYPE = "bfloat16"


def num_clients(cfg) -> int:
    """Clients of a round for the config, from the federation's registry (no data read)."""
    if cfg["mode"] == "centralized":
        return 1
    sites = list(federation_info(cfg["federation"]).sites)
    if cfg["federation"] == "synthetic":
        sites = [f"site{i}" for i in range(cfg["synthetic_sites"])]
    if cfg["sites"]:
        sites = [s for s in sites if s in cfg["sites"]]
    if not sites:
        raise UsageError(f"{cfg['federation']}: the sites come from the data; pass --config.sites=...")
    return max(1, len(sites) - (0 if cfg["no_unseen"] else 1))


def with_settings(cfg, loop: str, remat: bool) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.client_loop = loop
    out.model.remat = remat
    out.model.dtype = PLAN_DTYPE
    return out


def device_peak(cfg, clients_per_device: int, steps: int) -> dict:
    """XLA's memory analysis of one device's round (abstract weights, init_from ignored)."""
    scfg = model_init.sam_config(cfg)
    model = nnx.eval_shape(lambda: build_sam(scfg, rngs=nnx.Rngs(0)))
    engine = run_state.make_engine(cfg, model, mesh=mesh_lib.client_mesh(jax.devices()[:1]))
    size = cfg["image_size"]
    return round_memory(engine, clients_per_device, steps, cfg["batch_size"], (size, size),
                        (size // 4, size // 4, cfg["num_classes"]))


def overrides(loop: str, remat: bool) -> str:
    return (f"--config.model.dtype={PLAN_DTYPE} --config.client_loop={loop} "
            f"--config.model.remat={'true' if remat else 'false'}")


def choose(cfg, memory_gb: float, devices: int, steps: int, log=print) -> tuple[dict | None, list[dict]]:
    """(the first candidate that fits, every one measured): fastest first, stops at a fit."""
    per_device = math.ceil(num_clients(cfg) / devices)
    tried = []
    for loop, remat in CANDIDATES:
        mem = device_peak(with_settings(cfg, loop, remat), per_device, steps)
        row = dict(client_loop=loop, remat=remat, dtype=PLAN_DTYPE, clients_per_device=per_device,
                   peak_gb=mem["peak_bytes"] / GB, **mem)
        tried.append(row)
        log(f"[plan] {loop:10s} remat={'on ' if remat else 'off'} {per_device} client(s)/device x batch "
            f"{cfg['batch_size']}: peak {row['peak_gb']:.2f} GB per device (compiled in {mem['compile_s']:.0f} s)")
        if row["peak_gb"] <= memory_gb:
            return row, tried
    return None, tried


def smallest_change(cfg, best: dict) -> str:
    """The one-line advice when nothing fits. The best candidate trains one client at a
    time, so more devices barely help (they only spread the clients' optimizer state)."""
    return (f"use devices with at least {math.ceil(best['peak_gb'])} GB, or a smaller "
            f"--config.batch_size (activations scale with it; now {cfg['batch_size']})")


def main(argv: Sequence[str]) -> int:
    if config_cli.wants_help(argv):
        config_cli.raise_help("fedfms_jax.plan", __doc__, FLAGS, argv, default_config="prostate")
    flags, cli_overrides = config_cli.split_argv(argv, FLAGS)
    if "config" not in flags or "memory-gb" not in flags:
        raise UsageError("--config and --memory-gb are required")
    memory_gb = _positive(flags["memory-gb"], "--memory-gb", float)
    devices = _positive(flags.get("devices", jax.device_count()), "--devices", int)
    cfg = config_cli.load_training_config(flags["config"], cli_overrides)
    cfg.init_from = "random"  # the memory needs shapes only: plan before the weights are there
    run_config.validate(cfg)
    if cfg["cache_embeddings"]:
        raise UsageError("cache_embeddings trains on stored embeddings: the plan covers image rounds")
    steps = _positive(flags.get("steps", cfg["local_steps"] or 1), "--steps", int)
    print(f"[plan] {cfg['name'] or flags['config']}: {num_clients(cfg)} clients x batch {cfg['batch_size']} at "
          f"{cfg['image_size']} px, {steps} step(s) per round, {devices} device(s) of {memory_gb:g} GB; "
          f"memory of the {jax.default_backend()} compile, model.kernels={cfg['model']['kernels']}", flush=True)
    fit, tried = choose(cfg, memory_gb, devices, steps, log=lambda m: print(m, flush=True))
    if fit is None:
        best = min(tried, key=lambda r: r["peak_gb"])
        raise UsageError(f"{cfg['name'] or 'this config'} does not fit {memory_gb:g} GB per device: even "
                         f"{best['client_loop']} with remat needs {best['peak_gb']:.1f} GB; "
                         + smallest_change(cfg, best))
    print(overrides(fit["client_loop"], fit["remat"]))
    return 0


def _positive(text, flag: str, kind):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} must be a positive number, got {text!r}") from None
    if value <= 0:
        raise UsageError(f"{flag} must be a positive number, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], "plan"))
