r"""Memory plan: the fastest round settings of a training config that fit each device.

    python -m fedfms_jax.plan --config prostate:method=fedsam --memory-gb 80 [--devices 4] \
        [--steps N] [--config.x=v ...]

For the config as given, each candidate setting's round is compiled for abstract weights
and XLA's memory analysis gives the per-device peak (candidates and their order:
`memory_plan`). The first candidate that fits is printed as `--config.x=` overrides (exit
0); when none fits, one line says what does not fit and the smallest change that would
(exit 2). Paper configs (`plan=auto`) make the same choice by themselves at the start of
training, for the memory the device reports.

Devices: the round shards clients over D devices, so a device holds ceil(C / D) clients;
each device's program is compiled as a one-device round with that many clients (the same
per-device arrays; the collectives of the server step are left out, a few trainable-sized
buffers). The backend is this machine's: on a CPU plan for a GPU with
`--config.model.kernels=gpu` (XLA:CPU then materialises the attention scores that cuDNN's
fused kernel keeps on chip, so its figure is an upper bound for the GPU's). Each compile of
ViT-B at 1024 takes minutes on a small CPU.
"""
from __future__ import annotations

import sys
from typing import Sequence

import jax

from fedfms_jax import config_cli, memory_plan, run_config
from fedfms_jax.cli_errors import UsageError, run_cli

FLAGS = {
    "config": ("NAME|FILE[:ARGS]", "the training config to plan for (as train takes it)"),
    "memory-gb": ("N", "memory of one device in GB (10^9 bytes)"),
    "devices": ("D", "devices the clients are sharded over (default: this machine's)"),
    "steps": ("T", "local steps whose images a round holds (default: local_steps, else 1)"),
}


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
    steps = _positive(flags.get("steps", memory_plan.default_steps(cfg)), "--steps", int)
    print(f"[plan] {cfg['name'] or flags['config']}: {memory_plan.num_clients(cfg)} clients x batch "
          f"{cfg['batch_size']} at {cfg['image_size']} px, {steps} step(s) per round, {devices} device(s) of "
          f"{memory_gb:g} GB; memory of the {jax.default_backend()} compile, model.kernels={cfg['model']['kernels']}",
          flush=True)
    fit, tried = memory_plan.choose(cfg, memory_gb, devices, steps, log=lambda m: print(m, flush=True))
    if fit is None:
        raise memory_plan.does_not_fit(cfg, memory_gb, tried)
    print(memory_plan.overrides(fit))
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
