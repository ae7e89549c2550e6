"""The `evaluate` command: a trained model scored again on its run's data.

    python -m fedfms_jax.evaluate --workdir DIR [--weights MODEL] [--round R] [--out FILE]

scores a model on the data of the run in work dir DIR: each trained site's validation
split and the unseen site's full data, Dice/IoU both standard and threshold-averaged as
the original. The model is DIR's final/ (or the global model of checkpoint --round R),
or MODEL: a model directory or another work dir. It is loaded on its own; the dataset is
built only to score it. Results go to DIR/eval_round<R>.json (or --out) and a table on
the terminal.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from fedfms_jax import config_cli, run_config, run_state, trained_model, workdir as wd
from fedfms_jax.cli_errors import UsageError, run_cli
from fedfms_jax.evaluation import evaluate_federation, format_table, make_eval_step


# ---------------------------------------------------------------------------- command line
FLAGS = {
    "workdir": ("DIR", "a training work dir (required): its config.json names the data"),
    "weights": ("MODEL", "the model to score: a model directory or a work dir (default: DIR)"),
    "round": ("R", "the global model of checkpoint R (default: the work dir's final/ model)"),
    "out": ("FILE", "where the results go (default DIR/eval_round<R>.json)"),
}


def main(argv: Sequence[str]) -> int:
    if config_cli.wants_help(argv):
        config_cli.raise_help("fedfms_jax.evaluate", __doc__, FLAGS)
    flags, overrides = config_cli.split_argv(argv, FLAGS)
    if overrides:
        raise UsageError("evaluate takes no --config overrides: it uses the work dir's config.json")
    if "workdir" not in flags:
        raise UsageError("--workdir DIR is required")
    workdir = Path(flags["workdir"])
    rnd = int(flags["round"]) if "round" in flags else None
    cfg = wd.load_config(workdir)
    run_config.validate(cfg)
    source = Path(flags.get("weights") or workdir)
    trained = trained_model.load_trained(source, rnd)  # the model first: no data is needed for it
    per_site = None
    if cfg["mode"] == "local" and source == workdir:  # each site scores itself with its own model
        per_site = trained_model.site_trainables(workdir, trained.round)
    sc = run_state.scoring(cfg, trained.model, per_site)
    step = make_eval_step(sc.graphdef, sc.partition, sc.forward)
    result = evaluate_federation(step, sc.params_for_site, sc.fed, sc.train_sites, sc.unseen_site, cfg)
    result["round"] = trained.round
    name = f"eval_round{trained.round}.json" if trained.round is not None else "eval.json"
    out = Path(flags.get("out") or workdir / name)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    model_txt = f"global model of {workdir} at round {trained.round}" if source == workdir else f"model {source}"
    print(format_table(result, model_txt))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], "evaluate"))
