"""Where a model's weights are: a weights directory, or a training work dir.

A finished training run writes WORKDIR/final/ in exactly the format `convert` writes
(model.json + params.safetensors, frozen and trained parameters together). A work dir
therefore means its final/ model; a given round means final/'s parameters with the
trainable leaves of that round's checkpoint, since training never changes the frozen
ones. Nothing here builds a model or a dataset.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from fedfms_jax import checkpoint
from weights_convert.store import MODEL_JSON, read_meta, read_params
from weights_convert.tensorfile import CheckpointError

FINAL_DIR = "final"
RUN_CONFIG = "config.json"  # what marks a training work dir


class NoFinalModel(CheckpointError):
    """A training work dir whose run has not finished: it has checkpoints but no final/."""


class ModelSource(NamedTuple):
    doc: dict  # model.json
    tensors: Mapping[str, Any]  # slash path -> LazyTensor or array, Flax layout
    round: int | None  # training round of these weights; None for converted weights


def is_workdir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / RUN_CONFIG).is_file() and not (path / MODEL_JSON).is_file()


def final_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / FINAL_DIR


def model_source(path: str | os.PathLike, round_: int | None = None) -> ModelSource:
    """The weights at `path`: a weights directory, or a work dir (its final/, or `round_`)."""
    path = Path(path)
    if (path / MODEL_JSON).is_file():
        if round_ is not None:
            raise CheckpointError(f"--round applies to a training work dir; {path} is a weights directory")
        doc = read_meta(path)
        return ModelSource(doc, read_params(path), (doc.get("trained") or {}).get("round"))
    if not is_workdir(path):
        raise CheckpointError(f"{path} is neither a weights directory ({MODEL_JSON}) nor a training "
                              f"work dir ({RUN_CONFIG})")
    final = final_dir(path)
    if not (final / MODEL_JSON).is_file():
        raise NoFinalModel(f"{path} has no {FINAL_DIR}/ model yet (its run has not finished)")
    doc, tensors = read_meta(final), read_params(final)
    if round_ is None:
        return ModelSource(doc, tensors, (doc.get("trained") or {}).get("round"))
    local = (doc.get("trained") or {}).get("mode") == "local"
    step, trained = round_params(path, round_, local=local)
    return ModelSource(doc, overlay(tensors, trained, where=f"round {step} of {path}"), step)


def round_params(workdir: str | os.PathLike, round_: int | None, *, local: bool = False) -> tuple[int, dict]:
    """(round, {slash path: array}) of the global trainable leaves saved for `round_`
    (latest); `local`: the run's sites trained alone (the global model is their mean)."""
    try:
        return checkpoint.global_params(workdir, round_, local=local)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None


def overlay(tensors: Mapping[str, Any], trained: Mapping[str, Any], *, where: str) -> dict:
    """`tensors` with the leaves in `trained` replaced; refuses names `tensors` lacks."""
    unknown = sorted(set(trained) - set(tensors))
    if unknown:
        raise CheckpointError(f"{where} has {len(unknown)} parameters the model lacks "
                              f"(first: {unknown[0]}); the checkpoint belongs to another model")
    return {**tensors, **trained}
