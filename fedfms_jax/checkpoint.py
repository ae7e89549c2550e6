"""Orbax checkpoints of the federated training state, one per round, keep-last-N.

Saved per round: the engine state (global trainable params, client states, server
optimizer), the RNG key and a JSON block (data-loader position, round, names). The
frozen backbone is not saved: it is rebuilt from `init_from` on restore.
Restores use an abstract target so optax state types survive.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


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

    def save(self, round_: int, state, meta: dict) -> None:
        latest = self.manager.latest_step()
        if latest is not None and round_ <= latest:
            # orbax silently skips such a save; a resumed run never re-saves old rounds.
            raise RuntimeError(f"checkpoint for round {round_} would not be written (latest is {latest})")
        self.manager.save(round_, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, round_: int, abstract_state):
        abstract = jax.tree.map(_abstract, abstract_state)
        out = self.manager.restore(round_, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return x
