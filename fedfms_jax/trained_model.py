"""A trained model on its own: written to WORKDIR/final/, read back for predict/evaluate.

`write_final` stores the global model (frozen and trained parameters merged) in exactly
the format `weights_convert convert` writes, so `final/` is a portable model directory.
`load_trained` reads a model directory or a work dir (its final/, or `round_`) and
builds the model once; no dataset is built to load a model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from flax import nnx

from fedfms_jax import checkpoint, model_init, run_config, workdir as wd
from fedfms_jax.cli_errors import UsageError
from fedfms_jax.data.federations import data_slice_orientation
from weights_convert.store import (
    build_loaded, config_from_json, fill_model, model_variables, path_name, save_weights,
)
from weights_convert.tensorfile import CheckpointError
from weights_convert.workdir_model import NoFinalModel, final_dir, model_source, overlay, round_params


class TrainedModel(NamedTuple):
    config: Any  # SamConfig
    model: nnx.Module
    round: int | None  # training round of these weights; None for converted weights


def write_final(workdir: Path, cfg: dict, engine, trainable, *, round_: int) -> Path:
    """Write the global model `trainable` (with `engine`'s frozen leaves) of the run `cfg`
    to WORKDIR/final/, replacing an earlier one. Used by simulation and deployment alike."""
    model = nnx.merge(engine.graphdef, engine.partition.merge(trainable, engine.frozen), engine.rest)
    meta = {"trained": {"round": int(round_), "config_name": cfg["name"], "federation": cfg["federation"],
                        "method": cfg["method"], "mode": cfg["mode"]},
            # how predict must cut volumes: as this run's data was sliced
            "slice_orientation": data_slice_orientation(cfg["federation"], cfg["slice_orientation"])}
    return save_weights(final_dir(workdir), model, model_init.model_sam_config(cfg), meta=meta, force=True)


def load_trained(path: Path, round_: int | None = None) -> TrainedModel:
    """The model in a weights directory, or in a training work dir (its final/ model, or
    the global model of checkpoint `round_`)."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"model directory {path} does not exist")
    try:
        source = model_source(path, round_)
    except NoFinalModel:
        return _unfinished_round(path, round_)
    except (CheckpointError, OSError) as exc:
        raise UsageError(_one_line(exc)) from None
    try:
        config = config_from_json(source.doc["config"])
        model, _ = build_loaded(config, source.tensors, title=f"{path}: stored parameters do not match "
                                                              "the model its model.json describes:")
    except (CheckpointError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read the model in {path}: {_one_line(exc)}") from None
    return TrainedModel(config, model, source.round)


def _unfinished_round(workdir: Path, round_: int | None) -> TrainedModel:
    """A round of a run that has not written final/ yet: the model built from the run's
    `init_from` (the frozen leaves never change), its trainable leaves from the checkpoint."""
    cfg = wd.load_config(workdir)
    run_config.validate(cfg)
    try:
        step, trained = round_params(workdir, round_, local=cfg["mode"] == "local")
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    config, model, _ = model_init.build_model(cfg)
    values = {path_name(p): v.get_value() for p, v in model_variables(model)}
    try:
        fill_model(model, overlay(values, trained, where=f"round {step} of {workdir}"),
                              title=f"round {step} of {workdir} does not match its config's model:")
    except CheckpointError as exc:
        raise UsageError(_one_line(exc)) from None
    return TrainedModel(config, model, step)


def site_trainables(workdir: Path, round_: int | None):
    """The sites' own trainable trees (stacked, training-site order) of a run whose sites
    trained alone, from checkpoint `round_` (else the latest)."""
    try:
        return checkpoint.site_params(workdir, round_)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
