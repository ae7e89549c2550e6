"""The `evaluate` command: a training work dir's saved model evaluated again.

    python -m fedfms_jax.evaluate --workdir DIR [--round R] [--out FILE]

re-evaluates the model saved in a training work dir (latest round unless --round):
each trained site's validation split and the unseen site's full data, Dice/IoU both
standard and threshold-averaged as the original. Results go to DIR/eval_round<R>.json
(or --out) and a table on the terminal.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from fedfms_jax import config_cli, run_state
from fedfms_jax.cli_errors import UsageError, run_cli
from fedfms_jax.evaluation import evaluate_federation, format_table


# ---------------------------------------------------------------------------- command line
FLAGS = {
    "workdir": ("DIR", "a training work dir (required); its config.json rebuilds the model"),
    "round": ("R", "the checkpoint of round R (default: the latest)"),
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
    run = run_state.restore_run(workdir, rnd)
    result = evaluate_federation(run.eval_step, run.params_for_site, run.fed, run.train_sites,
                                 run.unseen_site, run.cfg)
    result["round"] = run.round
    out = Path(flags.get("out") or workdir / f"eval_round{run.round}.json")
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(format_table(result, f"global model of {workdir} at round {run.round}"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], "evaluate"))
