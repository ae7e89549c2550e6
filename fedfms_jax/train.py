r"""Federated fine-tuning of SAM (FedSAM / FedMSA) and its baselines.

    python -m fedfms_jax.train                      # the demo: configs/demo.py into runs/demo
    python -m fedfms_jax.train --config configs/prostate.py:method=fedmsa,unseen=2 \
        --workdir runs/prostate_u2 --config.rounds=50
    python -m fedfms_jax.train --config prostate:method=fedsam --config.init_from=weights/sam_vit_b

Re-running the same command on an existing work dir resumes from its last checkpoint;
a work dir made with another config is refused. Bad input ends with one line, exit 2;
a non-finite loss stops the run (exit 3) keeping the last good checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import ml_collections
import numpy as np

from fedfms_jax import config_cli, run_config, run_state, workdir as wd
from fedfms_jax.checkpoint import Checkpointer
from fedfms_jax.cli_errors import DivergedError, run_cli
from fedfms_jax.evaluate import evaluate_federation, format_table

# Test hook: SIGKILL this process right after the checkpoint of this round is written.
KILL_AFTER_ENV = "FEDFMS_KILL_AFTER_ROUND"


# ===================================================================================== config
FLAGS = {
    "config": ("NAME|FILE[:ARGS]", "a config by name (demo, prostate, fundus, ...) or a config file, "
               "with get_config(ARGS); default: demo"),
    "workdir": ("DIR", "where the run goes (default runs/<config name>; runs/demo for the demo); "
                "an existing work dir of the same config resumes"),
}
DEFAULT_CONFIG = "demo"


def parse_config(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, Path]:
    if config_cli.wants_help(argv):
        config_cli.raise_help("fedfms_jax.train", __doc__, FLAGS, argv, default_config=DEFAULT_CONFIG)
    flags, overrides = config_cli.split_argv(argv, FLAGS)
    cfg = config_cli.load_training_config(flags.get("config") or DEFAULT_CONFIG, overrides)
    run_config.validate(cfg)
    default_dir = Path("runs") / ("demo" if "config" not in flags else (cfg["name"] or "run"))
    return cfg, Path(flags.get("workdir") or default_dir)


# ============================================================================ progress output
def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def log(msg: str) -> None:
    print(msg, flush=True)


# ===================================================================================== main
def main(argv: Sequence[str]) -> int:
    cfg, workdir = parse_config(argv)
    run_state.enable_compilation_cache()
    path, resuming = wd.prepare(workdir, cfg)  # refuses before anything is written

    # ---------------------------------------------------------- data / model / optimizer / mesh
    t_setup = time.time()
    run = run_state.build_run(cfg)
    engine, fed = run.engine, run.fed
    log(f"[setup] {cfg['name'] or 'run'}: {cfg['federation']} {cfg['method']} ({cfg['mode']}), "
        f"train sites {run.train_sites}, unseen {run.unseen_site}; init {run.model_info['init_from']}; "
        f"trainable {run.model_info['trainable_params']:,} / frozen {run.model_info['frozen_params']:,} "
        f"params; {len(engine.mesh.devices.flat)} device(s)")
    sources = run_state.client_sources(cfg, fed, run.train_sites)[1]
    loader = run_state.make_loader(cfg, sources)
    weights = np.asarray(loader.num_samples, np.float32)
    weights = weights / weights.sum()  # FedAvg weighted by training samples
    from fedfms_jax.federated.comm import comm_bytes
    bytes_each_way = comm_bytes(engine.partition)

    # ------------------------------------------------------------------------- checkpoint
    if not resuming:
        wd.create(path, cfg)
    ckpt = Checkpointer(path / wd.CKPT_DIR, keep=cfg["checkpoint_keep"])
    mlog = wd.MetricsLog(path / wd.METRICS_FILE)
    rng = jax.random.key_data(jax.random.PRNGKey(cfg["seed"]))
    start, train_seconds, initial = 1, 0.0, None
    latest = ckpt.latest_round()
    if latest is not None:
        rng, meta = run.restore(ckpt, latest)
        loader.restore(meta["loader"])
        start, train_seconds = latest + 1, float(meta["train_seconds"])
        mlog.truncate_after(latest)
        log(f"[resume] {path}: continuing after round {latest}")
    else:
        mlog.truncate_after(-1)
    records = {r["round"]: r for r in mlog.records()}
    if 0 in records:
        initial = records[0]["eval"]

    # ------------------------------------------------------------------------------ evals
    def evaluate(round_: int, tag: str | None) -> dict:
        t0 = time.time()
        overlays = path / wd.OVERLAY_DIR if tag else None
        res = evaluate_federation(run.eval_step, run.params_for_site, fed, run.train_sites,
                                  run.unseen_site, cfg, overlay_dir=overlays, tag=tag or "")
        res["seconds"] = round(time.time() - t0, 3)
        return res

    if initial is None:
        log("[eval] initial model ...")
        initial = evaluate(0, "initial")
        mlog.append({"round": 0, "eval": initial, "seconds": 0.0})
        log(format_table(initial, "initial model (round 0)"))
    log(f"[setup] ready in {time.time() - t_setup:.1f}s; {loader.steps_per_round * cfg['local_epochs']} "
        f"local steps per round, {bytes_each_way / 1e6:.2f} MB per client each way")

    # ------------------------------------------------------------------------------- loop
    last_eval = records.get(max(records), {}).get("eval") if records else initial
    round_times: list[float] = []
    for r in range(start, cfg["rounds"] + 1):
        t0 = time.time()
        batches = run_state.round_batches(loader, cfg, r)
        losses, finite = train_round(run, batches, weights)
        bad = [c for c, ok in zip(run.clients, finite) if not ok]
        if bad:
            loss_txt = ", ".join(f"{c}={l:.4g}" for c, l in zip(run.clients, losses) if c in bad)
            keep = ckpt.latest_round()
            raise DivergedError(f"non-finite loss in round {r} on client {bad[0]} ({loss_txt}); "
                                f"stopped; last good checkpoint: round {keep if keep is not None else 'none'} "
                                f"in {path / wd.CKPT_DIR}")
        dt = time.time() - t0
        train_seconds += dt
        round_times.append(dt)
        eval_res = None
        if r % cfg["eval_every"] == 0 or r == cfg["rounds"]:
            eval_res = evaluate(r, "final" if r == cfg["rounds"] else None)
            last_eval = eval_res
        record = {"round": r, "client_loss": dict(zip(run.clients, map(float, losses))),
                  "comm_bytes": {"up_per_client": bytes_each_way, "down_per_client": bytes_each_way,
                                 "total": 2 * bytes_each_way * len(run.clients)},
                  "seconds": round(dt, 3), "train_seconds": round(train_seconds, 3)}
        if eval_res is not None:
            record["eval"] = eval_res
        mlog.append(record)  # before the checkpoint: a kill in between redoes this round
        run.save(ckpt, r, rng, {"round": r, "loader": loader.state(), "train_seconds": train_seconds})
        eta = np.mean(round_times[-5:]) * (cfg["rounds"] - r)
        loss_txt = " ".join(f"{c}={l:.4f}" for c, l in zip(run.clients, losses))
        msg = f"round {r}/{cfg['rounds']} | loss {loss_txt} | {dt:.1f}s | ETA {_fmt_s(eta)}"
        if eval_res is not None:
            msg += _eval_summary(eval_res)
        log(msg)
        if os.environ.get(KILL_AFTER_ENV) == str(r):
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    loader.close()

    # ---------------------------------------------------------------------------- results
    final = last_eval
    results = {
        "config_name": cfg["name"], "federation": cfg["federation"], "method": cfg["method"],
        "mode": cfg["mode"], "rounds": cfg["rounds"], "train_sites": run.train_sites,
        "unseen_site": run.unseen_site, "initial": _block(initial), "final": _block(final),
        "comm_bytes_per_round_per_client": bytes_each_way,
        "comm_bytes_per_round_per_client_both_ways": 2 * bytes_each_way,
        "trainable_params": run.model_info["trainable_params"], "train_seconds": round(train_seconds, 3),
    }
    wd.write_atomic(path / wd.RESULTS_FILE, json.dumps(results, indent=1, sort_keys=True) + "\n")
    log(summary_table(results))
    log(f"results: {path / wd.RESULTS_FILE}")
    return 0


# ================================================================================ update step
def train_round(run, batches, weights):
    """One round on every client; returns (losses [C], finite [C]) on the host."""
    if not run.local:
        run.state, m = run.engine.run_round(run.state, batches, weights)
        return np.asarray(m["loss"]), np.asarray(m["finite"])
    losses, finite = [], []
    for i, site in enumerate(run.clients):  # local-only: one client at a time, no aggregation
        own = {k: v[:, i:i + 1] for k, v in batches.items()}
        run.state[site], m = run.engine.run_round(run.state[site], own, np.ones(1, np.float32))
        losses.append(float(np.asarray(m["loss"])[0]))
        finite.append(bool(np.asarray(m["finite"])[0]))
    return np.asarray(losses), np.asarray(finite)


def _block(res: dict | None) -> dict:
    if not res:
        return {}
    out = {"sites": res.get("sites", {}), "average": res.get("average", {})}
    if "unseen" in res:
        out["unseen"] = res["unseen"]
    return out


def _eval_summary(res: dict) -> str:
    txt = ""
    if res.get("average"):
        txt += f" | val dice {res['average']['dice']:.4f}"
    if "unseen" in res and "dice" in res["unseen"]:
        txt += f" | unseen dice {res['unseen']['dice']:.4f} (thr-avg {res['unseen']['dice_thresh_avg']:.4f})"
    return txt


def summary_table(results: dict) -> str:
    lines = [f"{'':<22}{'initial dice':>14}{'final dice':>12}{'final thr-avg':>15}{'final iou':>11}"]
    init, fin = results["initial"], results["final"]
    names = list(fin.get("sites", {})) + (["unseen"] if "unseen" in fin else [])
    for name in names:
        a = init["unseen"] if name == "unseen" else init.get("sites", {}).get(name, {})
        b = fin["unseen"] if name == "unseen" else fin["sites"][name]
        if "dice" not in b:
            continue
        label = f"unseen ({results['unseen_site']})" if name == "unseen" else name
        lines.append(f"{label[:21]:<22}{a.get('dice', float('nan')):>14.4f}{b['dice']:>12.4f}"
                     f"{b['dice_thresh_avg']:>15.4f}{b['iou']:>11.4f}")
    lines.append(f"rounds {results['rounds']}, train {results['train_seconds']:.1f}s, "
                 f"{results['comm_bytes_per_round_per_client'] / 1e6:.2f} MB per client per round each way")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], "train"))
