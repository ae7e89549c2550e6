"""One hospital's side of a deployed run: its own data, the engine's jitted local update.

The node reads only its own site, from its own folders (node config `manual-dir` /
`data-dir`); the other sites are known by name only (the registry's list), which fixes
the training order. Model and frozen weights come from `init_from` (or the node's own
copy, `weights-dir`) and the seed exactly as the simulation builds them, so a site's
local update is the same function the simulation vmaps over its clients; the server's
hash of the starting weights checks that (see `start_weights`). The site's batches are
those the simulation's loader gives this client: the loader seeds each client's order
with its position among the training sites, so the other sites are stood in for by empty
placeholders.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import jax
import numpy as np

from fedfms_jax import model_init, run_state
from fedfms_jax.cli_errors import UsageError
from fedfms_jax.deploy.payload import leaves_to_tree
from fedfms_jax.deploy.start_weights import weights_sha256
from fedfms_jax.evaluation import evaluate_source, make_eval_step


class _Placeholder:
    """Stands in for another site's source; holds nothing the site may not see."""

    def __init__(self, example: dict, length: int):
        self._ex, self._n = example, length

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        return self._ex


def node_config(cfg: dict, *, data_dir: str = "", manual_dir: str = "", weights_dir: str = "") -> dict:
    """The run's config as this node sees it: its own data folders and weights copy."""
    cfg = json.loads(json.dumps(cfg))
    for key, value in (("data_dir", data_dir), ("manual_dir", manual_dir), ("init_from", weights_dir)):
        if value:
            cfg[key] = value
    return cfg


class SiteTrainer:
    """Local training and evaluation of `site` under config `cfg` (a plain config dict).

    data_dir / manual_dir: where this hospital's TFDS data / raw files are; weights_dir:
    its copy of the starting weights (each overrides the config's, which name the
    server's view of the world).
    """

    def __init__(self, cfg: dict, site: str, *, data_dir: str = "", manual_dir: str = "", weights_dir: str = ""):
        cfg = node_config(cfg, data_dir=data_dir, manual_dir=manual_dir, weights_dir=weights_dir)
        if cfg["mode"] != "federated":
            raise UsageError(f"deployment runs mode=federated only, config has {cfg['mode']!r}")
        names = run_state.site_names(cfg)
        if site not in names:
            raise UsageError(f"site {site!r} is not in {cfg['federation']} (sites: {', '.join(names)})")
        run_state.enable_compilation_cache()
        self.cfg, self.site = cfg, site
        self.train_sites, self.unseen_site = run_state.choose_sites(cfg, names, cfg["federation"])
        self.index = self.train_sites.index(site) if site in self.train_sites else None
        self.fed = run_state.load_federation(cfg, only_sites=(site,))
        _, model, _ = model_init.build_model(cfg, adapter_draws=len(self.train_sites))
        self.engine = run_state.make_engine(cfg, model)
        self.partition = self.engine.partition
        self.weights_sha256 = weights_sha256(self.engine.initial_trainable, self.engine.frozen)
        self._update = jax.jit(self.engine.local_update)
        self.eval_step = make_eval_step(self.engine.graphdef, self.partition, self.engine.forward)

    def info(self) -> dict:
        """What the server needs to know about this node before a round."""
        return {"site": self.site, "trains": int(self.trains), "unseen": int(self.site == self.unseen_site),
                "index": -1 if self.index is None else self.index, "num_samples": self.num_samples}

    # ------------------------------------------------------------------------------ train
    @property
    def trains(self) -> bool:
        return self.index is not None

    @property
    def num_samples(self) -> int:
        return len(self.fed.train(self.site)) if self.trains else 0

    @functools.cached_property
    def loader(self):
        own = self.fed.train(self.site)
        if not len(own):
            raise UsageError(f"site {self.site} has no training example")
        ex = own[0]
        blank = {k: np.zeros_like(np.asarray(ex[k])) for k in ("image", "mask")}
        steps_mode = self.cfg["local_steps"] > 0
        sources = [own if i == self.index else _Placeholder(blank, 1 if steps_mode else 0)
                   for i in range(len(self.train_sites))]
        return run_state.make_loader(self.cfg, sources)

    def batches(self, round_: int) -> dict:
        """This site's batches of round `round_` (1-based): [steps, B, ...]."""
        b = run_state.round_batches(self.loader, self.cfg, round_)
        return {k: np.ascontiguousarray(v[:, self.index]) for k, v in b.items()}

    def init_opt_state(self, trainable):
        return self.engine.client_tx.init(trainable)

    def train(self, global_leaves: list[np.ndarray], round_: int, opt_state: Any | None):
        """One round of local training from the global trainable leaves.

        Returns (update leaves = trained - global, new optimizer state, stats dict)."""
        g = leaves_to_tree(self.partition, [np.asarray(x) for x in global_leaves])
        if opt_state is None or not self.engine.keep_client_opt_state:
            opt_state = self.init_opt_state(g)
        tr, os, stats = self._update(g, opt_state, self.engine.frozen, self.engine.rest, g,
                                     self.batches(round_))
        update = jax.tree.map(lambda a, b: a - b, tr, g)
        leaves = [np.asarray(x) for x in self.partition.flatten_trainable(jax.device_get(update))]
        loss = float(stats["loss"])
        finite = bool(np.isfinite(loss) and all(np.all(np.isfinite(x)) for x in leaves))
        out = {"loss": loss, "steps": int(stats["steps"]), "finite": finite}
        return leaves, (jax.device_get(os) if finite else opt_state), out

    # --------------------------------------------------------------------------- evaluate
    def evaluate(self, global_leaves: list[np.ndarray]) -> dict:
        """Metric block of this site: its validation split, or all its data when unseen."""
        g = leaves_to_tree(self.partition, [np.asarray(x) for x in global_leaves])
        source = self.fed.all(self.site) if self.site == self.unseen_site else self.fed.val(self.site)
        block, _ = evaluate_source(self.eval_step, (g, self.engine.frozen, self.engine.rest), source,
                                   num_classes=self.cfg["num_classes"],
                                   batch_size=self.cfg["eval_batch_size"], limit=self.cfg["max_eval_images"])
        return block

    def close(self) -> None:
        if "loader" in self.__dict__:
            self.loader.close()
