"""Markdown table rows for BENCHMARKS.md from benchmark JSON files (round, encoder and
ops mode).

    python -m fedfms_jax.benchmarking.table results/*.json
"""
from __future__ import annotations

import json
import sys

from fedfms_jax.benchmarking import ops

ROUND_HEADER = (
    "| run | JAX img/s | PyTorch img/s | speedup | round s (JAX, spread) | round s (PyTorch, spread) "
    "| compile s | step s | aggregation s (JAX / PyTorch) | eval img/s (JAX / PyTorch) | peak memory "
    "| GFLOP/image | achieved TFLOP/s | MFU | comm MB/client/round |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
ENCODER_HEADER = (
    "| run | JAX img/s | PyTorch img/s | speedup | JAX s (spread) | PyTorch s (spread) | compile s | GFLOP/image |\n"
    "|---|---|---|---|---|---|---|---|"
)


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _timing(t) -> str:
    return "-" if not t else f"{t['median_s']:.2f} ({100 * t['spread']:.0f}%)"


def round_row(r: dict) -> str:
    c, j, t = r["config"], r["jax"], r.get("torch") or {}
    name = (f"{c['method']} {c['variant']}@{c['image_size']} {c['clients']}x{c['batch']}x{c['steps']} "
            f"{j['dtype']}{' remat' if c.get('remat') else ''}")
    return " | ".join([
        f"| {name}",
        _f(j["images_per_s"]),
        _f(t.get("images_per_s")),
        _f(r.get("speedup"), "{:.2f}x"),
        _timing(j["round"]),
        _timing(t.get("round")),
        _f(j["compile_s"], "{:.1f}"),
        _f(j["step_s"], "{:.3f}"),
        f"{_f(j.get('aggregate_s'), '{:.4f}')} / {_f(t.get('aggregate_s'), '{:.4f}')}",
        f"{_f(j.get('eval_images_per_s'))} / {_f(t.get('eval_images_per_s'))}",
        "-" if j["peak_memory_bytes"] is None else f"{j['peak_memory_bytes'] / 2**30:.2f} GiB",
        _f(j["flops_per_image"] / 1e9, "{:.1f}"),
        _f(j["achieved_flops"] / 1e12, "{:.3f}"),
        _f(100 * j["mfu"], "{:.1f}%"),
        _f(j["comm_bytes_per_round"] / 1e6, "{:.1f}") + " |",
    ])


def encoder_row(r: dict) -> str:
    c, j, t = r["config"], r["jax"], r.get("torch") or {}
    return " | ".join([
        f"| encoder {c['variant']}@{c['image_size']} batch {c['batch']} {j['dtype']}",
        _f(j["images_per_s"], "{:.3f}"),
        _f(t.get("images_per_s"), "{:.3f}"),
        _f(r.get("speedup"), "{:.2f}x"),
        _timing(j["timing"]),
        _timing(t.get("timing")),
        _f(j["compile_s"], "{:.1f}"),
        _f(j["flops_per_image"] / 1e9, "{:.1f}") + " |",
    ])


def ops_table(r: dict, min_share: float = ops.SMALL_SHARE) -> str:
    """Markdown table of an ops-mode result: its groups, the small ones summed in one row."""
    c = r["config"]
    lines = [
        f"{c['method']} {c['variant']}@{c['image_size']} {c['clients']}x{c['batch']}x{c['steps']} {r['dtype']}: "
        f"wall {r['wall_s_per_round']:.2f} s per round, op events {r['op_s_per_round']:.2f} s, "
        f"round MFU {100 * r['mfu']:.1f}% of {r['peak_flops'] / 1e9:.0f} GFLOP/s",
        "",
        "| ops | s per round | share | ops per round | of which / rate |",
        "|---|---:|---:|---:|---|",
    ]
    small = [g for g in r["groups"] if g["share"] < min_share]
    for g in r["groups"]:
        if g["share"] < min_share:
            continue
        if "achieved_flops" in g:
            note = f"{g['achieved_flops'] / 1e9:.0f} GFLOP/s = {100 * g['fraction_of_peak']:.0f}% of peak"
        else:
            note = ", ".join(f"`{stem}` {sec:.2f}" for stem, sec in g.get("stems_s_per_round", [])[:3]
                             if sec >= 0.005)
        label = g["group"] if g["category"] != ops.ELEMENTWISE else f"`{g['group']}`"
        lines.append(f"| {label} | {g['s_per_round']:.2f} | {100 * g['share']:.1f} % | {g['ops_per_round']:.0f} "
                     f"| {note} |")
    if small:
        lines.append(f"| {len(small)} more kinds, each < {100 * min_share:.1f} % "
                     f"| {sum(g['s_per_round'] for g in small):.2f} | {100 * sum(g['share'] for g in small):.1f} % "
                     f"| {sum(g['ops_per_round'] for g in small):.0f} | |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    results = [json.load(open(p)) for p in paths]
    rounds = [r for r in results if r.get("mode") == "round"]
    encoders = [r for r in results if r.get("mode") == "encoder"]
    if rounds:
        print(ROUND_HEADER)
        for r in rounds:
            print(round_row(r))
    if encoders:
        print()
        print(ENCODER_HEADER)
        for r in encoders:
            print(encoder_row(r))
    for r in results:
        if r.get("mode") == "ops":
            print()
            print(ops_table(r))
    for r in results:
        print(f"\n{r.get('date_utc')} UTC, {r.get('device')}, jax {r.get('jax_version')}: "
              f"config {r.get('config')}")


if __name__ == "__main__":
    main(sys.argv[1:])
