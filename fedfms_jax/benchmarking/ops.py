"""Ops mode: where a federated round's time goes, op by op, from XLA's own trace.

The round is the one round mode times (`federated_round.build_jax_round`). After the
warm-up rounds, `repeats` rounds run under `jax.profiler.trace`; the trace it writes
(plugins/profile/<run>/<host>.trace.json.gz) holds one event per executed HLO op.
XLA:CPU records those events only with `--xla_cpu_enable_xprof_traceme=true` in XLA_FLAGS,
which XLA reads once when the backend starts, so `benchmark.py` runs this mode in a
fresh process with the flag added (`flags_with_traceme`).

Op time is summed per round and grouped by kind: matrix products, each kind of
elementwise fusion (its name without the numeric suffix, e.g. `multiply_add_fusion`),
copies and transposes, reductions, dynamic(-update)-slices, collectives, other. XLA:CPU
runs products and some reductions as fusions named for the library that computes them
(`ynn_fusion.3` for YNNPACK), so an op counts as a matrix product (a reduction) when its
fused computation in the compiled HLO holds a dot or convolution (a reduce), not by its
name alone (`hlo_categories`). On a CPU with several cores XLA runs independent ops at
the same time, so the summed op time can exceed the round's wall time; the report gives
both.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path

XPROF_FLAG = "--xla_cpu_enable_xprof_traceme=true"

MATMUL = "matrix products"
COPY = "copies / transposes"
REDUCTION = "reductions"
DYNAMIC_SLICE = "dynamic(-update)-slices"
CONTROL_FLOW = "control flow"
COLLECTIVE = "collectives"
OTHER = "other"

# Category of every group that is not one of the fixed ones above.
ELEMENTWISE = "elementwise fusion"

# Ops whose events enclose the events of the ops they run (loop bodies, branches); their
# time is the children's time again, so it is reported apart and not summed. JAX names a
# conditional after its primitive ('cond.3'), so the HLO's opcode decides (`hlo_categories`).
_CONTROL_FLOW_STEMS = {"while", "conditional", "call"}
_MATMUL_WORDS = {"dot", "matmul", "gemm", "convolution", "conv"}
# Between devices (several only where XLA_FLAGS fakes them on a CPU, as the tests do).
_COLLECTIVE_STEMS = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"}
_COPY_WORDS = {"copy", "transpose"}
_REDUCTION_WORDS = {"reduce", "reduction"}


def flags_with_traceme(flags: str) -> str:
    """XLA_FLAGS with XLA:CPU's per-op trace events switched on."""
    return flags if XPROF_FLAG in flags.split() else f"{flags} {XPROF_FLAG}".strip()


def op_stem(name: str) -> str:
    """An HLO op's name without its numeric suffixes: 'multiply_add_fusion.12' -> 'multiply_add_fusion'."""
    return re.sub(r"(\.(\d+|clone))+$", "", name)


def _words(stem: str) -> set[str]:
    return set(re.split(r"[_\-.]", stem))


def op_category(stem: str) -> str:
    """The fixed group an op stem belongs to, or ELEMENTWISE for the other fusions."""
    words = _words(stem)
    if stem in _CONTROL_FLOW_STEMS:
        return CONTROL_FLOW
    if stem.removesuffix("-start").removesuffix("-done") in _COLLECTIVE_STEMS:
        return COLLECTIVE
    if words & _MATMUL_WORDS:  # 'conv' is a word of its own: 'convert' is not a product
        return MATMUL
    if {"dynamic", "slice"} <= words:
        return DYNAMIC_SLICE
    if words & _REDUCTION_WORDS:
        return REDUCTION
    if words & _COPY_WORDS:
        return COPY
    if stem.endswith("fusion") or stem.startswith("wrapped_"):
        return ELEMENTWISE
    return OTHER


def op_group(name: str, hlo_category: dict[str, str] | None = None) -> tuple[str, str]:
    """(group, category) of an op; elementwise fusions are grouped by their stem.
    `hlo_category`: the categories the compiled HLO shows (`hlo_categories`), first."""
    stem = op_stem(name)
    category = (hlo_category or {}).get(name) or op_category(stem)
    return (stem if category == ELEMENTWISE else category), category


_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$")
_HLO_PRODUCT = re.compile(r" (?:dot|convolution)\(|custom_call_target=\"[^\"]*(?:matmul|convolution|gemm)", re.I)
_HLO_REDUCE = re.compile(r" reduce(?:-window)?\(")
_HLO_CONTROL_FLOW = re.compile(r" (?:while|conditional|call)\(")
_HLO_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """{op name: MATMUL, REDUCTION or CONTROL_FLOW} for the ops of an optimised HLO module
    (`compiled.as_text()`) that compute a matrix product (dots, convolutions, matmul custom
    calls, fusions holding one), that are loops, branches or calls, or, among the other
    fusions, that reduce."""
    product_in: dict[str, str] = {}      # product instruction -> its computation
    reducing: set[str] = set()           # computations holding a reduce
    control_flow: set[str] = set()
    fusion_calls: dict[str, str] = {}    # op name -> the computation it fuses
    computation = None
    for line in hlo_text.splitlines():
        header = _HLO_COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        instruction = _HLO_INSTRUCTION.match(line)
        if instruction is None or computation is None:
            continue
        name, rest = instruction.groups()
        if _HLO_PRODUCT.search(rest):
            product_in[name] = computation
        elif _HLO_REDUCE.search(rest):
            reducing.add(computation)
        elif _HLO_CONTROL_FLOW.search(rest):
            control_flow.add(name)
        called = _HLO_CALLS.search(rest)
        if called:
            fusion_calls[name] = called.group(1)
    fused = set(fusion_calls.values())  # the instructions inside a fusion never run as ops
    categories = {name: CONTROL_FLOW for name in control_flow}
    categories.update({name: MATMUL for name, computation in product_in.items() if computation not in fused})
    holding_product = set(product_in.values())
    for name, called in fusion_calls.items():
        if called in holding_product:
            categories[name] = MATMUL
        elif called in reducing:
            categories[name] = REDUCTION
    return categories


def hlo_module_name(hlo_text: str) -> str:
    """'HloModule jit_round, ...' -> 'jit_round', the name the trace's op events carry."""
    return hlo_text.split(None, 2)[1].rstrip(",")


def _trace_file(log_dir: str | Path) -> Path:
    # The profiler writes this Chrome-trace JSON itself (jax 0.10); create_perfetto_trace
    # would only add a copy of it without the metadata.
    found = sorted(Path(log_dir).glob("plugins/profile/*/*.trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"jax.profiler.trace wrote no *.trace.json.gz under {log_dir}")
    return found[-1]


def is_op_event(event: dict) -> bool:
    """An XLA op's execution (not a Python, runtime or profiler event): only those carry
    the op and its module in their args (XLA:CPU's 'end: <op>' markers do not)."""
    return event.get("ph") == "X" and "hlo_op" in event.get("args", {})


def read_op_events(log_dir: str | Path) -> list[tuple[str, str, float]]:
    """(HLO module, op name, seconds) of every XLA op event in the trace under `log_dir`."""
    with gzip.open(_trace_file(log_dir), "rt") as f:
        events = json.load(f)["traceEvents"]
    return [(e["args"].get("hlo_module", ""), e["args"]["hlo_op"], e["dur"] * 1e-6)
            for e in events if is_op_event(e)]


@dataclasses.dataclass
class _Tally:
    seconds: float = 0.0
    count: int = 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.count += 1


def summarize_ops(events: list[tuple[str, str, float]], *, rounds: int, wall_s_per_round: float,
                  matmul_flops_per_round: float, peak_flops: float, top: int = 15,
                  hlo_category: dict[str, dict[str, str]] | None = None) -> dict:
    """Op time per round by group and the `top` single ops, from (module, op, seconds)
    events; `hlo_category`: module -> `hlo_categories` of its compiled HLO."""
    if not events:
        raise ValueError("no XLA op events to summarise")
    hlo_category = hlo_category or {}
    groups: dict[tuple[str, str], _Tally] = collections.defaultdict(_Tally)
    stems: dict[tuple[str, str], _Tally] = collections.defaultdict(_Tally)  # (group, stem)
    by_op: dict[tuple[str, str], _Tally] = collections.defaultdict(_Tally)
    by_module: dict[str, _Tally] = collections.defaultdict(_Tally)
    for module, name, seconds in events:
        group = op_group(name, hlo_category.get(module))
        groups[group].add(seconds)
        if group[1] != CONTROL_FLOW:
            stems[group[0], op_stem(name)].add(seconds)
            by_op[module, name].add(seconds)
            by_module[module].add(seconds)
    control = groups.pop((CONTROL_FLOW, CONTROL_FLOW), _Tally())
    total = sum(t.seconds for t in groups.values())
    if total <= 0:
        raise ValueError("the XLA op events hold no time outside loops and branches")
    rows = []
    for (group, category), tally in sorted(groups.items(), key=lambda kv: -kv[1].seconds):
        row = {"group": group, "category": category, "s_per_round": tally.seconds / rounds,
               "share": tally.seconds / total, "ops_per_round": tally.count / rounds}
        if category != ELEMENTWISE:  # which ops make up a fixed group: [stem, s], slowest first
            row["stems_s_per_round"] = [
                [stem, t.seconds / rounds]
                for (g, stem), t in sorted(stems.items(), key=lambda kv: -kv[1].seconds) if g == group]
        if group == MATMUL:
            row["flops_per_round"] = matmul_flops_per_round
            row["achieved_flops"] = matmul_flops_per_round * rounds / tally.seconds
            row["fraction_of_peak"] = row["achieved_flops"] / peak_flops
        rows.append(row)
    top_ops = []
    for (module, name), tally in sorted(by_op.items(), key=lambda kv: -kv[1].seconds)[:top]:
        group, _ = op_group(name, hlo_category.get(module))
        top_ops.append({"op": name, "module": module, "group": group, "s_per_round": tally.seconds / rounds,
                        "share": tally.seconds / total, "ops_per_round": tally.count / rounds})
    return {
        "op_events": len(events),
        "op_s_per_round": total / rounds,
        "wall_s_per_round": wall_s_per_round,
        "op_time_over_wall": total / rounds / wall_s_per_round,
        # Loops' and branches' own events span the ops inside them: shown, not summed.
        "control_flow_s_per_round": control.seconds / rounds,
        "groups": rows,
        "modules_s_per_round": {m: t.seconds / rounds for m, t in by_module.items()},
        "top_ops": top_ops,
    }


def _traced_rounds(jr, repeats: int, log_dir: str) -> list[float]:
    """Wall seconds of `repeats` rounds run under the profiler."""
    import jax

    seconds = []
    with jax.profiler.trace(log_dir):
        for _ in range(repeats):
            t0 = time.perf_counter()
            jr.run()
            seconds.append(time.perf_counter() - t0)
    return seconds


def run_ops(cfg) -> dict:
    """Build and compile the round, warm up, trace `repeats` rounds; the per-op summary."""
    from fedfms_jax.benchmarking import flops as flops_lib
    from fedfms_jax.benchmarking.federated_round import build_jax_round
    from fedfms_jax.benchmarking.stats import Timing, progress

    jr = build_jax_round(cfg)
    for w in range(cfg.warmup):
        progress(f"ops: warm-up round {w + 1}/{cfg.warmup}")
        jr.run()
    progress(f"ops: {cfg.repeats} round(s) under jax.profiler.trace")
    round_hlo = jr.compiled.as_text()
    hlo_category = {hlo_module_name(round_hlo): hlo_categories(round_hlo)}
    with tempfile.TemporaryDirectory(prefix="fedfms_ops_") as log_dir:
        wall = _traced_rounds(jr, cfg.repeats, log_dir)
        events = read_op_events(log_dir)
    if not events:
        raise RuntimeError(
            f"the profiler trace holds no XLA op events (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); "
            f"XLA:CPU writes them only with {XPROF_FLAG} set before jax starts, which "
            "`python -m fedfms_jax.benchmark` does for mode=ops")
    progress("ops: measuring the matmul peak")
    peak, peak_source = flops_lib.device_peak(jr.dtype_name, cfg.peak)
    local_steps = cfg.steps * cfg.clients
    wall_s = sum(wall) / len(wall)  # the mean, to compare with the op time summed over all rounds
    summary = summarize_ops(events, rounds=cfg.repeats, wall_s_per_round=wall_s,
                            matmul_flops_per_round=jr.matmul_step * local_steps,
                            peak_flops=peak, top=cfg.top, hlo_category=hlo_category)
    flops_per_round = jr.flops_step * local_steps
    return {
        "mode": "ops",
        "dtype": jr.dtype_name,
        "compile_s": jr.compile_s,
        "round": Timing(tuple(wall)).as_dict(),
        "flops_per_round": flops_per_round,
        "flops_source": jr.flops_source,
        "matmul_flops_source": "jaxpr matmul+conv count of one local step x local steps",
        "peak_flops": peak,
        "peak_source": peak_source,
        "mfu": flops_per_round / wall_s / peak,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **summary,
    }


# Groups below this share are summed into one line of the printed table (the JSON has all).
SMALL_SHARE = 0.005


def _row(label: str, seconds: float, share: float, count: float, note: str = "") -> str:
    return f"  {label:40s} {seconds:8.3f} {100 * share:6.1f}% {count:10.0f}{note}"


def _header(label: str, note: str = "") -> str:
    return f"  {label:40s} {'s/round':>8s} {'share':>7s} {'ops/round':>10s}{note}"


def format_ops(r: dict) -> str:
    c = r["config"]
    lines = [
        f"per-op profile of one federated round: {c['method']} {c['variant']} @ {c['image_size']}, "
        f"{c['clients']} clients x batch {c['batch']} x {c['steps']} local steps ({r['dtype']}) on {r['device']}",
        f"  {len(r['round']['samples_s'])} traced round(s): wall {r['wall_s_per_round']:.3f} s per round, "
        f"XLA op events {r['op_s_per_round']:.3f} s per round ({r['op_time_over_wall']:.2f}x the wall time:",
        f"  ops run side by side on the {r['cpu_count']} cores, and the time between ops is in no event); "
        f"loops' own events ({r['control_flow_s_per_round']:.3f} s) span their ops and are not summed",
        f"  round MFU {100 * r['mfu']:.1f}% ({r['flops_per_round'] / 1e9:.1f} GFLOP per round, "
        f"{r['flops_source']}; peak {r['peak_flops'] / 1e9:.1f} GFLOP/s, {r['peak_source']})",
        "",
        _header("group"),
    ]
    small = [g for g in r["groups"] if g["share"] < SMALL_SHARE]
    for g in r["groups"]:
        if g["share"] >= SMALL_SHARE:
            note = ""
            if "achieved_flops" in g:
                note = (f"   {g['achieved_flops'] / 1e9:.1f} GFLOP/s = {100 * g['fraction_of_peak']:.0f}% of peak "
                        f"({g['flops_per_round'] / 1e9:.1f} GFLOP per round)")
            elif len(g.get("stems_s_per_round", [])) > 1:
                note = "   " + ", ".join(f"{stem} {sec:.3f}" for stem, sec in g["stems_s_per_round"][:3])
            lines.append(_row(g["group"], g["s_per_round"], g["share"], g["ops_per_round"], note))
    if small:
        lines.append(_row(f"{len(small)} more groups, each < {100 * SMALL_SHARE:.1f}%",
                          sum(g["s_per_round"] for g in small), sum(g["share"] for g in small),
                          sum(g["ops_per_round"] for g in small)))
    lines += ["", _header(f"top {len(r['top_ops'])} ops", "  group")]
    lines += [_row(o["op"], o["s_per_round"], o["share"], o["ops_per_round"], f"  {o['group']}")
              for o in r["top_ops"]]
    return "\n".join(lines)
