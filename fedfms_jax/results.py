"""results.json of a run and its summary table, the same for a simulated run (`train`)
and a deployed one (the Flower server)."""
from __future__ import annotations

import json
from pathlib import Path

from fedfms_jax import workdir as wd


def result_block(res: dict | None) -> dict:
    """An evaluation (sites, average, unseen) as results.json keeps it; {} when none."""
    if not res:
        return {}
    out = {"sites": res.get("sites", {}), "average": res.get("average", {})}
    if "unseen" in res:
        out["unseen"] = res["unseen"]
    return out


def assemble(cfg: dict, train_sites: list[str], unseen_site: str | None, *, initial: dict | None,
             final: dict | None, bytes_each_way: int, trainable_params: int, train_seconds: float,
             **extra) -> dict:
    """The results.json document; `extra` adds keys (e.g. the deployment's `deploy`)."""
    return {
        "config_name": cfg["name"], "federation": cfg["federation"], "method": cfg["method"],
        "mode": cfg["mode"], "rounds": cfg["rounds"], "train_sites": train_sites,
        "unseen_site": unseen_site, "initial": result_block(initial), "final": result_block(final),
        "comm_bytes_per_round_per_client": bytes_each_way,
        "comm_bytes_per_round_per_client_both_ways": 2 * bytes_each_way,
        "trainable_params": trainable_params, "train_seconds": round(train_seconds, 3),
        **extra,
    }


def write(workdir: Path, results: dict) -> Path:
    """Write results.json into `workdir` (atomically); returns its path."""
    path = Path(workdir) / wd.RESULTS_FILE
    wd.write_atomic(path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    return path


def summary_table(results: dict) -> str:
    lines = [f"{'':<22}{'initial dice':>14}{'final dice':>12}{'final thr-avg':>15}{'final iou':>11}"]
    init, fin = results["initial"], results["final"]
    names = list(fin.get("sites", {})) + (["unseen"] if "unseen" in fin else [])
    for name in names:
        a = init.get("unseen", {}) if name == "unseen" else init.get("sites", {}).get(name, {})
        b = fin["unseen"] if name == "unseen" else fin["sites"][name]
        if "dice" not in b:
            continue
        label = f"unseen ({results['unseen_site']})" if name == "unseen" else name
        lines.append(f"{label[:21]:<22}{a.get('dice', float('nan')):>14.4f}{b['dice']:>12.4f}"
                     f"{b['dice_thresh_avg']:>15.4f}{b['iou']:>11.4f}")
    lines.append(f"rounds {results['rounds']}, train {results['train_seconds']:.1f}s, "
                 f"{results['comm_bytes_per_round_per_client'] / 1e6:.2f} MB per client per round each way")
    return "\n".join(lines)
