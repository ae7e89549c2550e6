"""Memory plan: the fastest round settings of a training config that fit a device.

For the config as given, the round program is compiled for abstract weights (nothing big
is allocated) with each candidate setting, fastest first, and XLA's memory analysis of it
gives the per-device peak: arguments + outputs - aliased (donated) + temporaries. The
first candidate that fits wins.

Candidates, fastest first (bf16 compute with float32 master weights in each):
  1. every client of a device at once (client_loop=vmap), no remat
  2. one client at a time (client_loop=sequential): one client of batch 4 at 1024
     already fills a GPU, so this costs little
  3. all at once with remat (recompute each encoder block in the backward pass: about a
     third more encoder work)
  4. one at a time with remat
The order is an estimate (not timed here); the memory is measured.

Used by `python -m fedfms_jax.plan` (any budget, printed as overrides) and by training
configs with `plan=auto` (the paper configs): the budget is then the memory the device
reports (or `plan_memory_gb`), and the chosen settings replace the configured ones.
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from fedfms_jax import model_init, run_config, run_state
from fedfms_jax.cli_errors import UsageError
from fedfms_jax.data.registry import federation_info
from fedfms_jax.federated import mesh as mesh_lib
from fedfms_jax.federated.memory_report import round_memory
from fedfms_jax.models.sam import build_sam

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


def default_steps(cfg) -> int:
    """Local steps whose images one round holds: local_steps, else one."""
    return cfg["local_steps"] or 1


def device_peak(cfg, clients_per_device: int, steps: int) -> dict:
    """XLA's memory analysis of one device's round (abstract weights, init_from ignored)."""
    scfg = model_init.sam_config(cfg)
    model = nnx.eval_shape(lambda: build_sam(scfg, rngs=nnx.Rngs(0)))
    engine = run_state.make_engine(cfg, model, mesh=mesh_lib.client_mesh(jax.devices()[:1]))
    size = cfg["image_size"]
    return round_memory(engine, clients_per_device, steps, cfg["batch_size"], (size, size),
                        (size // 4, size // 4, cfg["num_classes"]))


def overrides(settings: dict) -> str:
    return (f"--config.model.dtype={settings['dtype']} --config.client_loop={settings['client_loop']} "
            f"--config.model.remat={'true' if settings['remat'] else 'false'}")


def choose(cfg, memory_gb: float, devices: int, steps: int, log=print) -> tuple[dict | None, list[dict]]:
    """(the first candidate that fits, every one measured): fastest first, stops at a fit."""
    per_device = math.ceil(num_clients(cfg) / devices)
    tried = []
    for loop, remat in CANDIDATES:
        settings = dict(client_loop=loop, remat=remat, dtype=PLAN_DTYPE)
        mem = device_peak(run_config.with_plan_settings(cfg, settings), per_device, steps)
        row = dict(settings, clients_per_device=per_device, peak_gb=mem["peak_bytes"] / GB, **mem)
        tried.append(row)
        log(f"[plan] {loop:10s} remat={'on ' if remat else 'off'} {per_device} client(s)/device x batch "
            f"{cfg['batch_size']}: peak {row['peak_gb']:.2f} GB per device (compiled in {mem['compile_s']:.0f} s)")
        if row["peak_gb"] <= memory_gb:
            return row, tried
    return None, tried


def does_not_fit(cfg, memory_gb: float, tried: list[dict]) -> UsageError:
    """The one-line error when no candidate fits. The best candidate trains one client at a
    time, so more devices barely help (they only spread the clients' optimizer state)."""
    best = min(tried, key=lambda r: r["peak_gb"])
    return UsageError(
        f"{cfg['name'] or 'this config'} does not fit {memory_gb:g} GB per device: even "
        f"{best['client_loop']} with remat needs {best['peak_gb']:.1f} GB; use devices with at least "
        f"{math.ceil(best['peak_gb'])} GB, or a smaller --config.batch_size (activations scale with "
        f"it; now {cfg['batch_size']})")


def device_memory_gb() -> float | None:
    """Memory of one device as JAX reports it (accelerators), None where it reports none (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return limit / GB if limit else None


def auto_settings(cfg, log=print) -> dict | None:
    """For `plan=auto`: the settings that fit this machine's devices, None to keep the config's.

    Raises UsageError (one line) when nothing fits, before anything is written.
    """
    if cfg["plan"] != "auto" or cfg["cache_embeddings"]:
        return None
    memory_gb = cfg["plan_memory_gb"] or device_memory_gb()
    if not memory_gb:
        log(f"[plan] {jax.default_backend()}: the device reports no memory limit, so the round runs as "
            f"configured (--config.plan_memory_gb=N plans for N GB per device; --config.plan=off skips this)")
        return None
    devices = jax.device_count()
    log(f"[plan] choosing round settings for {devices} device(s) of {memory_gb:g} GB: each candidate is "
        f"compiled once for XLA's memory analysis, fastest first (--config.plan=off skips this)")
    fit, tried = choose(cfg, memory_gb, devices, default_steps(cfg), log=log)
    if fit is None:
        raise does_not_fit(cfg, memory_gb, tried)
    settings = {k: fit[k] for k in ("client_loop", "remat", "dtype")}
    log(f"[plan] chosen: {overrides(settings)}")
    return settings
