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

import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import ml_collections
import numpy as np

from fedfms_jax import config_cli, curves, memory_plan, results, run_config, run_state, workdir as wd
from fedfms_jax.checkpoint import Checkpointer
from fedfms_jax.cli_errors import DivergedError, run_cli
from fedfms_jax.evaluation import evaluate_federation, format_table
from fedfms_jax.federated.comm import comm_bytes
from fedfms_jax.trained_model import write_final
from fedfms_jax.federated.fedavg_weights import fedavg_weights


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
    given, workdir = parse_config(argv)
    run_state.enable_compilation_cache()
    path, resuming = wd.prepare(workdir, given)  # refuses before anything is written
    # plan=auto: the round settings that fit this device, chosen once per work dir.
    planned = wd.read_plan(path) if resuming else memory_plan.auto_settings(given, log=log)
    if planned and resuming:
        log(f"[plan] as chosen when this work dir was made: {memory_plan.overrides(planned)}")
    cfg = run_config.with_plan_settings(given, planned) if planned else given

    # ---------------------------------------------------------- data / model / optimizer / mesh
    t_setup = time.time()
    run = run_state.build_run(cfg)
    engine, fed = run.engine, run.fed
    log(f"[setup] {cfg['name'] or 'run'}: {cfg['federation']} {cfg['method']} ({cfg['mode']}), "
        f"train sites {run.train_sites}, unseen {run.unseen_site}; init {run.model_info['init_from']}; "
        f"trainable {run.model_info['trainable_params']:,} / frozen {run.model_info['frozen_params']:,} "
        f"params; {len(engine.mesh.devices.flat)} device(s)")
    if cfg["cache_embeddings"]:
        log("[embed] the frozen image encoder's embedding of every image, once (kept on disk for later runs)")
        fed.embed_sites(run.train_sites + ([run.unseen_site] if run.unseen_site else []))
    sources = run_state.client_sources(cfg, fed, run.train_sites)[1]
    loader = run_state.make_loader(cfg, sources)
    weights = fedavg_weights(loader.num_samples, cfg["client_weights"])  # shares of the training samples
    bytes_each_way = comm_bytes(engine.partition)

    # ------------------------------------------------------------------------- checkpoint
    if not resuming:
        wd.create(path, given)
        if planned:
            wd.write_plan(path, planned)
    ckpt = Checkpointer(path / wd.CKPT_DIR, keep=cfg["checkpoint_keep"])
    mlog = wd.MetricsLog(path / wd.METRICS_FILE)
    board = curves.TensorBoardLog(path / curves.TENSORBOARD_DIR)
    rng = jax.random.key_data(jax.random.PRNGKey(cfg["seed"]))
    start, train_seconds, initial = 1, 0.0, None
    latest = ckpt.latest_round()
    if latest is not None:
        run.state, rng, meta = ckpt.restore_run(latest, run.state)
        run.round = int(meta["round"])
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
        board.add({"round": 0, "eval": initial})
        log(format_table(initial, "initial model (round 0)"))
    log(f"[setup] ready in {time.time() - t_setup:.1f}s; {loader.steps_per_round * cfg['local_epochs']} "
        f"local steps per round, {bytes_each_way / 1e6:.2f} MB per client each way")

    # ------------------------------------------------------------------------------- loop
    last_eval = records.get(max(records), {}).get("eval") if records else initial
    round_times: list[float] = []
    if start <= cfg["rounds"]:
        log("[compile] compiling the round program (first run only: later runs load it from the cache) ...")
    for r in range(start, cfg["rounds"] + 1):
        t0 = time.time()
        batches = run_state.round_batches(loader, cfg, r)
        run.state, m = engine.run_round(run.state, batches, weights)
        losses, finite = np.asarray(m["loss"]), np.asarray(m["finite"])
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
        board.add(record)
        if eval_res is not None:
            curves.write_dice_plot(mlog.records(), path / curves.DICE_PLOT, title=cfg["name"] or "")
        ckpt.save_run(r, run.state, rng, {"round": r, "loader": loader.state(), "train_seconds": train_seconds})
        steady = round_times[1:] or round_times  # this process's first round includes compiling
        eta = np.mean(steady[-5:]) * (cfg["rounds"] - r)
        loss_txt = " ".join(f"{c}={l:.4f}" for c, l in zip(run.clients, losses))
        took = f"{dt:.1f}s" + (" incl. compile" if len(round_times) == 1 else "")
        msg = f"round {r}/{cfg['rounds']} | loss {loss_txt} | {took} | ETA {_fmt_s(eta)}"
        if eval_res is not None:
            msg += _eval_summary(eval_res)
        log(msg)
    ckpt.close()
    loader.close()
    board.close()

    # ------------------------------------------------------------------------ final model
    final_dir = write_final(path, cfg, engine, run.global_trainable(), round_=cfg["rounds"])
    log(f"final model: {final_dir}")

    # ---------------------------------------------------------------------------- results
    out = results.assemble(cfg, run.train_sites, run.unseen_site, initial=initial, final=last_eval,
                           bytes_each_way=bytes_each_way, trainable_params=run.model_info["trainable_params"],
                           train_seconds=train_seconds)
    written = results.write(path, out)
    log(results.summary_table(out))
    log(f"results: {written}")
    return 0


# ============================================================================ progress line
def _eval_summary(res: dict) -> str:
    txt = ""
    if res.get("average"):
        txt += f" | val dice {res['average']['dice']:.4f}"
    if "unseen" in res and "dice" in res["unseen"]:
        txt += f" | unseen dice {res['unseen']['dice']:.4f} (thr-avg {res['unseen']['dice_thresh_avg']:.4f})"
    return txt


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], "train"))
