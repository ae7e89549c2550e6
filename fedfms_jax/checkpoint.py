"""A run's checkpoints: orbax, one per round, keep-last-N, in WORKDIR/checkpoints.

The one place that writes and reads them. Two trees are stored, each with a JSON meta
block (round, train_seconds, data-loader position, ...):
  * a simulation run: {"fed": engine state, "rng": key data} (`save_run`/`restore_run`);
    when every site trains alone its model is the site's row of the state's client_params;
  * a deployed server: {"global": trainable params, "server_opt": optimizer state}.
The frozen backbone is not saved: it is the run's `init_from`, and it is in the run's
portable model (`final/`). Restores use an abstract target so optax state types survive;
`global_params` reads a round's global model without any target (no model is built).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedfms_jax.workdir import CKPT_DIR

RNG_SHAPE = jax.ShapeDtypeStruct((2,), np.uint32)


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_round(self) -> int | None:
        return self.manager.latest_step()

    def all_rounds(self) -> list[int]:
        return list(self.manager.all_steps())

    # ---------------------------------------------------------------- any tree
    def save(self, round_: int, state, meta: dict) -> None:
        latest = self.manager.latest_step()
        if latest is not None and round_ <= latest:
            # orbax silently skips such a save; a resumed run never re-saves old rounds.
            raise RuntimeError(f"checkpoint for round {round_} would not be written (latest is {latest})")
        self.manager.save(round_, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, round_: int, like_state):
        """(state, meta) of round `round_`, shaped, typed and placed like `like_state`."""
        abstract = jax.tree.map(_abstract, like_state)
        out = self.manager.restore(round_, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def read(self, round_: int):
        """(state as nested dicts of arrays, meta) of round `round_`, with no target."""
        out = self.manager.restore(round_, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    # ---------------------------------------------------------------- a simulation run
    def save_run(self, round_: int, state, rng, meta: dict) -> None:
        self.save(round_, {"fed": to_tree(state), "rng": rng}, meta)

    def restore_run(self, round_: int, like_state):
        """(engine state like `like_state`, rng key data, meta) of round `round_`."""
        like = {"fed": to_tree(like_state), "rng": RNG_SHAPE}
        tree, meta = self.restore(round_, like)
        return from_tree(tree["fed"], like_state), tree["rng"], meta

    def close(self) -> None:
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def to_tree(state) -> dict:
    """FedState -> plain dict for orbax."""
    return state._asdict()


def from_tree(tree, like):
    return type(like)(**tree)


def sample_weighted_mean(per_site, samples):
    """The mean of the sites' trainable trees (stacked on a leading site axis, possibly
    padded) weighted by their training samples: the global model of a run whose sites
    train alone."""
    w = np.asarray(samples, np.float64)
    w = w / w.sum()
    return jax.tree.map(lambda x: sum(wi * x[i] for i, wi in enumerate(w)), per_site)


def global_tree(tree: Mapping, meta: Mapping, *, local: bool = False):
    """The global model's trainable tree in a saved round, whichever kind of run saved it;
    `local`: the sites trained alone (their mean, weighted as the run weighted them)."""
    if "global" in tree:  # a deployed server
        return tree["global"]
    if not local:
        return tree["fed"]["global_params"]
    per_site = jax.tree.map(jnp.asarray, tree["fed"]["client_params"])
    return sample_weighted_mean(per_site, meta["loader"]["num_samples"])


def flat_names(tree) -> dict[str, np.ndarray]:
    """Nested dict of arrays -> {"a/b/0/kernel": array} (the models' slash-joined paths)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(x)
            for path, x in leaves}


def open_workdir(workdir: str | Path) -> Checkpointer:
    """The checkpoints of work dir `workdir`, for reading (keep-N only matters when saving)."""
    directory = Path(workdir) / CKPT_DIR
    if not directory.is_dir():  # the manager would create it
        raise ValueError(f"{workdir} has no checkpoints yet")
    return Checkpointer(directory)


def pick_round(ckpt: Checkpointer, round_: int | None, where) -> int:
    """`round_`, or the latest one; ValueError naming the saved rounds when there is none."""
    rounds = ckpt.all_rounds()
    if not rounds:
        raise ValueError(f"{where} has no checkpoints yet")
    if round_ is None:
        return rounds[-1]
    if round_ not in rounds:
        raise ValueError(f"{where} has no checkpoint of round {round_} (have {rounds})")
    return round_


def global_params(workdir: str | Path, round_: int | None = None, *,
                  local: bool = False) -> tuple[int, dict[str, np.ndarray]]:
    """(round, {slash path: array}): the global trainable leaves of a work dir's checkpoint
    (latest round unless `round_`), read without building the model. `local`: the run's
    sites trained alone."""
    with open_workdir(workdir) as ckpt:
        step = pick_round(ckpt, round_, workdir)
        tree, meta = ckpt.read(step)
    return step, flat_names(global_tree(tree, meta, local=local))


def site_params(workdir: str | Path, round_: int | None = None):
    """The sites' own trainable trees of a run whose sites train alone, stacked on a
    leading site axis (training-site order), from checkpoint `round_` (latest)."""
    with open_workdir(workdir) as ckpt:
        tree, _ = ckpt.read(pick_round(ckpt, round_, workdir))
    return tree["fed"]["client_params"]


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return x
