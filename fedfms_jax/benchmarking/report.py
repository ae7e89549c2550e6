"""Human-readable summary and the JSON written by `--json`."""
from __future__ import annotations

import json
import math
from typing import Any

# Keys every round-mode JSON carries at top level (None where not measured, e.g. --no-torch).
SUMMARY_KEYS = (
    "jax_images_per_s",
    "torch_images_per_s",
    "speedup",
    "compile_s",
    "step_s_median",
    "peak_memory_bytes",
    "flops_per_image",
    "mfu",
    "comm_bytes_per_round",
)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}{unit}"
        return f"{v:.3f}{unit}"
    return f"{v}{unit}"


def _gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def format_round(r: dict) -> str:
    j, t = r["jax"], r.get("torch")
    c = r["config"]
    lines = [
        f"fedfms_jax benchmark: {c['method']} {c['variant']} @ {c['image_size']}, "
        f"{c['clients']} clients x batch {c['batch']} x {c['steps']} local steps "
        f"({r['images_per_round']} training images per round) on {r['device']}",
        f"  JAX ({j['dtype']}, remat={c['remat']}, scan_blocks={c.get('scan_blocks', False)}):",
        f"    train           {_fmt(j['images_per_s'])} img/s   round {_fmt(j['round']['median_s'])} s "
        f"(spread {100 * j['round']['spread']:.1f}%, n={len(j['round']['samples_s'])})",
        f"    step            {_fmt(j['step_s'])} s per client step of {c['batch']} images",
        f"    compile         {_fmt(j['compile_s'])} s",
        f"    aggregation     {_fmt(j.get('aggregate_s'))} s",
        f"    eval            {_fmt(j.get('eval_images_per_s'))} img/s",
        f"    comm            {_mb(j['comm_bytes_per_round'])} per client per round each way",
        f"    peak memory     {_gib(j['peak_memory_bytes'])} ({j['peak_memory_source']})",
        f"    FLOPs/image     {_fmt(j['flops_per_image'])} ({j['flops_source']}; "
        f"matmul-only {_fmt(j.get('matmul_flops_per_image'))})",
        f"    achieved        {_fmt(j['achieved_flops'])} FLOP/s; peak {_fmt(j['peak_flops'])} "
        f"({j['peak_source']}); MFU {100 * j['mfu']:.1f}%",
    ]
    if t is not None:
        lines += [
            f"  PyTorch original-style (fp32 eager, {t['threads']} threads, {t['device']}):",
            f"    train           {_fmt(t['images_per_s'])} img/s   round {_fmt(t['round']['median_s'])} s "
            f"(spread {100 * t['round']['spread']:.1f}%, n={len(t['round']['samples_s'])})",
            f"    step            {_fmt(t['step_s'])} s per client step",
            f"    aggregation     {_fmt(t['aggregate_s'])} s",
            f"    eval            {_fmt(t.get('eval_images_per_s'))} img/s",
            f"    achieved        {_fmt(t['achieved_flops'])} FLOP/s; MFU {100 * t['mfu']:.1f}% of the JAX "
            f"peak above, {_pct(t.get('mfu_own_peak'))} of torch's own fp32 matmul "
            f"({_fmt(t.get('matmul_peak_flops'))} FLOP/s)",
            f"  speedup (JAX / PyTorch images/s): {r['speedup']:.2f}x "
            f"({'each side in its own process' if r.get('processes') == 'separate' else 'both in one process'})",
        ]
    return "\n".join(lines)


def format_encoder(r: dict) -> str:
    j, t = r["jax"], r.get("torch")
    c = r["config"]
    lines = [
        f"image encoder forward: {c['variant']} @ {c['image_size']}, batch {c['batch']} on {r['device']}",
        f"  JAX ({j['dtype']}): {_fmt(j['images_per_s'])} img/s, median {_fmt(j['timing']['median_s'])} s "
        f"(spread {100 * j['timing']['spread']:.1f}%), compile {_fmt(j['compile_s'])} s, "
        f"{_fmt(j['flops_per_image'])} FLOPs/image",
    ]
    if t is not None:
        lines += [
            f"  PyTorch official ({t['threads']} threads): {_fmt(t['images_per_s'])} img/s, "
            f"median {_fmt(t['timing']['median_s'])} s (spread {100 * t['timing']['spread']:.1f}%)",
            f"  speedup (JAX / PyTorch): {r['speedup']:.2f}x",
        ]
    return "\n".join(lines)


def _clean(obj):
    """JSON-safe: non-finite floats become null, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):
        return _clean(obj.item())
    return obj


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_clean(result), f, indent=2, sort_keys=True)
        f.write("\n")
