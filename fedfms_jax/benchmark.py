"""Throughput benchmark: one federated round in JAX beside the PyTorch original.

    python -m fedfms_jax.benchmark [--config benchmark[:k=v,...]] [--json OUT] [--no-torch]

Modes (config `mode`):
- round (default): one federated round of `method` (fedmsa/fedsam) for `variant` at
  `image_size` with `clients` x `batch` images per local step and `steps` local steps;
  the PyTorch reference trains the same shapes the way the original does (one model per
  client, clients in turn, eager fp32, Adam, BCEWithLogits(pos_weight=2), averaging one
  parameter at a time). Each side runs in a fresh process of its own, JAX first, then
  PyTorch (`processes=same` runs both in this process, as figures before 2026-12-03 were).
- encoder: the image encoder's forward alone, jitted JAX vs the official PyTorch model.
- profile: one local step of one client, part by part (encoder forward, model forward,
  forward + backward, optimizer step, model copy), JAX beside PyTorch.
- ops: round mode's JAX round under XLA's per-op trace (in a process of its own with
  XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true): op time per round grouped by kind
  (matrix products, elementwise fusions by kind, copies, reductions, ...), the matrix
  products' FLOP/s against the measured matmul peak, and the `top` single ops.

Prints a summary; `--json` writes every figure (see benchmarking/report.py for the keys).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from fedfms_jax import config_cli
from fedfms_jax.benchmarking import report
from fedfms_jax.benchmarking.stats import progress

SIDES = ("jax", "torch")

DEFAULT_CONFIG = "benchmark"


def load_config(spec: str):
    """'NAME|path/to/config.py[:k=v,...]' -> the module's get_config(arg)."""
    name_or_path, _, arg = spec.partition(":")
    path = config_cli.config_path(name_or_path)
    module_spec = importlib.util.spec_from_file_location("_benchmark_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _machine() -> dict:
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }


def run(cfg) -> dict:
    """Run the benchmark described by `cfg` (see configs/benchmark.py); returns the result."""
    if cfg.mode == "encoder":
        from fedfms_jax.benchmarking.encoder import run_encoder

        result = run_encoder(cfg)
    elif cfg.mode == "profile":
        from fedfms_jax.benchmarking.breakdown import run_profile

        result = run_profile(cfg)
    else:
        from fedfms_jax.benchmarking.federated_round import run_round

        result = run_round(cfg)
    result.update(_machine())
    result["config"] = cfg.to_dict()
    return result


def _fields_help(argv: list[str]) -> str:
    """--help's list of the config's fields (the one --config names, else the default)."""
    if not config_cli.wants_help(argv):
        return ""
    spec = config_cli.config_spec_in(argv) or DEFAULT_CONFIG
    fields = "\n".join(config_cli.format_fields(load_config(spec))).replace("--config.", "")
    return f"config fields of {spec} and their defaults (set with --config {spec.partition(':')[0]}:k=v,...):\n{fields}"


def run_side(cfg, side: str) -> dict:
    """One side of round mode (or ops mode's traced JAX round), with what its process was
    doing around it."""
    from fedfms_jax.benchmarking import federated_round

    load_before = list(os.getloadavg())
    if cfg.mode == "ops":
        from fedfms_jax.benchmarking.ops import run_ops

        figures = run_ops(cfg)
    else:
        figures = federated_round.run_jax_side(cfg) if side == "jax" else federated_round.run_torch_side(cfg)
    figures["process"] = {
        "pid": os.getpid(), "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
        # XLA:CPU runs one intra-op thread per core; torch uses cfg.threads (0: every core).
        "threads": figures.get("threads") or os.cpu_count(),
        "torch_imported": "torch" in sys.modules,
    }
    return figures


def _side_in_child(spec: str, side: str, env: dict | None = None) -> dict:
    """`benchmark --side SIDE` in a fresh process; the figures it writes."""
    with tempfile.TemporaryDirectory(prefix="fedfms_bench_") as tmp:
        out = Path(tmp) / f"{side}.json"
        cmd = [sys.executable, "-m", "fedfms_jax.benchmark", "--config", spec, "--side", side,
               "--json", str(out)]
        code = subprocess.run(cmd, env=env).returncode
        if code:
            raise SystemExit(f"benchmark: the {side} side failed (exit {code}); its output is above")
        return json.loads(out.read_text())


def run_sides_apart(spec: str, cfg) -> dict:
    """JAX, then PyTorch, each in a fresh process of its own; the result as `run` gives it."""
    from fedfms_jax.benchmarking.federated_round import combine

    figures = {}
    for side in SIDES:
        progress(f"{side}: starting its own process")
        figures[side] = _side_in_child(spec, side)
    result = combine(cfg, figures["jax"], figures["torch"])
    result["processes"] = "separate"
    result.update(_machine())
    result["config"] = cfg.to_dict()
    return result


def run_ops_traced(spec: str, cfg) -> dict:
    """Ops mode in a fresh process with XLA:CPU's per-op trace events on: XLA reads the
    flag once, when the backend starts, so this process cannot switch it on for itself."""
    from fedfms_jax.benchmarking.ops import flags_with_traceme

    env = dict(os.environ, XLA_FLAGS=flags_with_traceme(os.environ.get("XLA_FLAGS", "")))
    progress(f"ops: starting a process with XLA_FLAGS={env['XLA_FLAGS']!r}")
    result = _side_in_child(spec, "jax", env)
    result.update(_machine())
    result["config"] = cfg.to_dict()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m fedfms_jax.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=_fields_help(argv or []))
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="a config by name (benchmark) or a config file with get_config(arg), "
                             "optionally ':k=v,k=v'")
    parser.add_argument("--json", metavar="OUT", help="write all figures to this JSON file")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--side", choices=SIDES,
                        help="round mode: time only this side and write its figures to --json "
                             "(what the separate processes run); ops mode: jax, the traced round")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.no_torch:
        cfg.torch = False
    if args.side:
        if cfg.mode not in ("round", "ops") or not args.json or (cfg.mode == "ops" and args.side != "jax"):
            parser.error("--side is for round mode (or jax in ops mode) and needs --json")
        figures = run_side(cfg, args.side)
        report.write_json(figures, args.json)
        return figures
    load_before = list(os.getloadavg())
    if cfg.mode == "round" and cfg.torch and cfg.processes == "separate":
        result = run_sides_apart(args.config, cfg)
    elif cfg.mode == "ops":
        result = run_ops_traced(args.config, cfg)
    else:
        result = run(cfg)
    # Other processes on a shared machine slow both sides; keep the load with the figures.
    result["load_average_before"] = load_before
    if cfg.mode == "profile":
        from fedfms_jax.benchmarking.breakdown import format_profile

        text = format_profile(result)
    elif cfg.mode == "ops":
        from fedfms_jax.benchmarking.ops import format_ops

        text = format_ops(result)
    else:
        text = report.format_encoder(result) if cfg.mode == "encoder" else report.format_round(result)
    after = result["load_average_1_5_15"]
    text += (f"\n  machine load (1-min average) before {load_before[0]:.1f}, after {after[0]:.1f} "
             f"on {result['cpu_count']} cores")
    print(text, flush=True)
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
