"""Federated input pipeline: per-client sources -> [clients, batch, ...] uint8 batches.

Every batch is a pure function of (seed, round, step): client i's order in its epoch e is
a permutation drawn from (seed, i, e), and each example's augmentation from
(seed, i, e, example index). The cursor (round, step) is therefore the whole state, so a
restarted run continues at exactly the same batch.

Two ways to walk the data:
- mode="epoch": a round is one local epoch of every client; the round has
  max_i ceil(n_i / B) steps; a client that runs out early gets valid=False rows (zeros);
  a partial final batch is padded with valid=False rows (the original uses drop_last=False).
- mode="steps": every client yields exactly `steps` batches per round, cycling its epochs.

The host keeps uint8; normalisation happens on the device (the model's `preprocess`).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True  # random horizontal and vertical flips
    rot90: bool = True  # random multiple of 90 degrees (square images only)
    intensity: float = 0.0  # max relative contrast / brightness change, e.g. 0.1


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    """Apply the same geometric transform to image [S,S,3] and mask [S/4,S/4,C]."""
    if cfg.flip:
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            image, mask = image[::-1], mask[::-1]
    if cfg.rot90:
        k = int(rng.integers(0, 4))
        if k:
            image, mask = np.rot90(image, k), np.rot90(mask, k)
    if cfg.intensity > 0:
        gain = 1.0 + rng.uniform(-cfg.intensity, cfg.intensity)
        bias = 255.0 * rng.uniform(-cfg.intensity, cfg.intensity) / 2
        # One scalar transform per image: a 256-entry lookup table is far cheaper than float math.
        lut = np.clip(np.round(np.arange(256, dtype=np.float32) * gain + bias), 0, 255).astype(np.uint8)
        image = lut[image]
    return image, mask


class FederatedLoader:
    """Batches of every client stacked on a leading clients axis.

    Args:
      sources: one random-access source per client (len + __getitem__ returning a dict with
        "image" uint8 [S,S,3] and "mask" uint8 [S/4,S/4,C]).
      batch_size: B, rows per client per step.
      seed: everything random derives from it.
      shuffle: permute each client's examples anew every epoch.
      augment: None or an AugmentConfig.
      mode: "epoch" or "steps" (see module docstring); steps: local steps per round in "steps" mode.
      drop_remainder: drop each client's partial final batch instead of padding it.
      num_workers: threads reading and augmenting examples (default 2 per CPU, at most 16).
    """

    def __init__(self, sources: Sequence[Any], batch_size: int, *, seed: int, shuffle: bool = True,
                 augment: AugmentConfig | None = None, mode: str = "epoch", steps: int | None = None,
                 drop_remainder: bool = False, num_workers: int | None = None):
        if mode not in ("epoch", "steps"):
            raise ValueError(f"mode must be 'epoch' or 'steps', got {mode!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.sources = list(sources)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.augment = augment
        self.mode = mode
        self.drop_remainder = drop_remainder
        self.num_samples = [len(s) for s in self.sources]
        b = self.batch_size
        self.batches_per_epoch = [n // b if drop_remainder else -(-n // b) for n in self.num_samples]
        if mode == "steps":
            if not steps or steps < 1:
                raise ValueError("mode='steps' needs steps >= 1")
            empty = [i for i, k in enumerate(self.batches_per_epoch) if k == 0]
            if empty:
                raise ValueError(f"clients {empty} have no full batch to cycle in mode='steps'")
            self.steps_per_round = int(steps)
        else:
            self.steps_per_round = max(self.batches_per_epoch, default=0)
        self._shapes = self._example_shapes()
        self._round, self._step = 0, 0
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._pool = ThreadPoolExecutor(num_workers or min(16, 2 * (os.cpu_count() or 1)))

    @property
    def num_clients(self) -> int:
        return len(self.sources)

    def _example_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        for src in self.sources:
            if len(src):
                ex = src[0]
                return {k: (np.shape(ex[k]), np.asarray(ex[k]).dtype) for k in ("image", "mask")}
        raise ValueError("every client source is empty")

    # -- where each client is -------------------------------------------------------------
    def _slot(self, client: int, round_index: int, step: int) -> tuple[int, int] | None:
        """(epoch, position) of `client`'s batch at (round, step), or None when it has none."""
        k = self.batches_per_epoch[client]
        if self.mode == "epoch":
            return (round_index, step * self.batch_size) if step < k else None
        flat = round_index * self.steps_per_round + step
        return flat // k, (flat % k) * self.batch_size

    def _order(self, client: int, epoch: int) -> np.ndarray:
        key = (client, epoch)
        if key not in self._perm_cache:
            n = self.num_samples[client]
            order = (np.random.default_rng([self.seed, client, epoch]).permutation(n)
                     if self.shuffle else np.arange(n))
            if len(self._perm_cache) > 4 * max(1, self.num_clients):
                self._perm_cache.clear()
            self._perm_cache[key] = order
        return self._perm_cache[key]

    def _load_into(self, out: dict, client: int, row: int, epoch: int, index: int) -> None:
        ex = self.sources[client][int(index)]
        image, mask = np.asarray(ex["image"]), np.asarray(ex["mask"])
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, client, epoch, int(index), 1])
            image, mask = augment(image, mask, rng, self.augment)
        # The (possibly strided) copy into the batch runs in the worker: numpy drops the GIL.
        out["image"][client, row] = image
        out["mask"][client, row] = mask
        out["valid"][client, row] = True

    # -- batches ------------------------------------------------------------------------
    def batch(self, round_index: int, step: int) -> dict[str, np.ndarray]:
        """The batch at (round, step); pure, does not move the cursor."""
        if not 0 <= step < self.steps_per_round:
            raise IndexError(f"step {step} outside 0..{self.steps_per_round - 1}")
        c, b = self.num_clients, self.batch_size
        (ishape, idtype), (mshape, mdtype) = self._shapes["image"], self._shapes["mask"]
        out = {"image": np.zeros((c, b, *ishape), idtype), "mask": np.zeros((c, b, *mshape), mdtype),
               "valid": np.zeros((c, b), bool)}
        jobs = []
        for client in range(c):
            slot = self._slot(client, round_index, step)
            if slot is None:
                continue
            epoch, pos = slot
            rows = self._order(client, epoch)[pos:pos + b]
            for row, index in enumerate(rows):
                jobs.append(self._pool.submit(self._load_into, out, client, row, epoch, index))
        for job in jobs:
            job.result()  # re-raises a worker's error
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """The remaining steps of the current round; afterwards the cursor is at the next round."""
        if self._step >= self.steps_per_round:  # a finished round whose generator was not drained
            self._round, self._step = self._round + 1, 0
        while self._step < self.steps_per_round:
            out = self.batch(self._round, self._step)
            self._step += 1
            yield out
        self._round, self._step = self._round + 1, 0

    def __len__(self) -> int:
        return self.steps_per_round

    def round_batches(self, round_index: int) -> dict[str, np.ndarray]:
        """Every step of round `round_index` stacked: [steps, clients, B, ...] (one lax.scan).

        Moves the cursor to the start of the next round, so state() then is the resume point.
        """
        batches = [self.batch(round_index, s) for s in range(self.steps_per_round)]
        self._round, self._step = round_index + 1, 0
        return {k: np.stack([bt[k] for bt in batches]) for k in ("image", "mask", "valid")}

    # -- resumable state ----------------------------------------------------------------
    def state(self) -> dict:
        clients = []
        for i in range(self.num_clients):
            slot = (self._slot(i, self._round, self._step) if self._step < self.steps_per_round else None)
            if slot is None:  # exhausted for this round: its next batch is the next round's first
                slot = (self._slot(i, self._round + 1, 0) or (self._round + 1, 0))
            clients.append({"epoch": int(slot[0]), "position": int(slot[1])})
        return {"version": STATE_VERSION, "seed": self.seed, "round": self._round, "step": self._step,
                "mode": self.mode, "batch_size": self.batch_size, "num_samples": list(self.num_samples),
                "clients": clients}

    def restore(self, state: dict) -> None:
        for key in ("seed", "mode", "batch_size", "num_samples"):
            mine = getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(f"loader state does not match this loader: {key} {state.get(key)!r} != {mine!r}")
        if not 0 <= state["step"] <= self.steps_per_round:
            raise ValueError(f"state step {state['step']} outside this loader's round")
        self._round, self._step = int(state["round"]), int(state["step"])
        if self.state()["clients"] != state["clients"]:
            raise ValueError("loader state's client positions do not match its round/step")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "FederatedLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- devices ------------------------------------------------------------------------------
def client_sharding(mesh, axis: str = "clients", *, stacked: bool = False):
    """NamedSharding splitting the clients axis (axis 0, or 1 for round_batches' [steps, clients, ...])."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    return NamedSharding(mesh, P(None, axis) if stacked else P(axis))


def to_device(batch: dict[str, np.ndarray], sharding) -> dict:
    """Put every array of `batch` on the devices with `sharding` (e.g. client_sharding(mesh))."""
    import jax
    return jax.device_put(batch, sharding)


def prefetch_to_device(batches: Iterable[dict], sharding, size: int = 2) -> Iterator[dict]:
    """Yield device-resident batches while a background thread prepares the next `size`."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for bt in batches:
                if stop.is_set():
                    return
                q.put(to_device(bt, sharding))
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
