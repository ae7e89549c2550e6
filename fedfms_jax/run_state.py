"""Everything a run is made of, built from its config: data, model, engine, state.

Shared by `train` (fresh or resumed), `evaluate` and `predict` (restored from a work
dir's checkpoint), so that all three rebuild exactly the same model and state layout.

Modes: "federated" (FedAvg over the training sites), "centralized" (one client holding
the pooled training sites), "local" (every site trains alone: the engine's clients are
the sites, trained without aggregation, each site's model held in the state's
client_params; the unseen site is scored with the sample-weighted mean of the local models).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from fedfms_jax import model_init, run_config, workdir as wd
from fedfms_jax.checkpoint import Checkpointer
from fedfms_jax.cli_errors import UsageError
from fedfms_jax.evaluation import make_eval_step


def enable_compilation_cache() -> None:
    """Persist compiled programs across runs: a resumed run does not compile again, and
    neither does a deployed hospital's ClientApp, which Flower starts afresh for every
    message. Every program is kept, however quick to compile: the many small ones add up
    in a process that lives for one round. (JAX keeps no program with a host call: on a
    CPU that is the deep encoders' fusion barrier, see models/fusion_barrier.)"""
    if not jax.config.jax_compilation_cache_dir:
        from fedfms_jax.data.assets import cache_dir
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# ------------------------------------------------------------------------------ data
def load_federation(cfg: dict):
    from fedfms_jax.data.federations import get_federation
    kw = {}
    if cfg["federation"] == "synthetic":
        kw = dict(num_sites=cfg["synthetic_sites"], images_per_site=cfg["synthetic_images"],
                  num_classes=cfg["num_classes"], seed=cfg["seed"])
    try:
        fed = get_federation(cfg["federation"], image_size=cfg["image_size"],
                             data_dir=cfg["data_dir"] or None, manual_dir=cfg["manual_dir"] or None, **kw)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"federation {cfg['federation']!r}: {exc}") from None
    if fed.num_classes != cfg["num_classes"]:
        raise UsageError(f"config num_classes={cfg['num_classes']} but {fed.name} has {fed.num_classes} classes")
    return fed


def resolve_sites(cfg: dict, fed) -> tuple[list[str], str | None]:
    sites = list(fed.sites)
    if cfg["sites"]:
        unknown = [s for s in cfg["sites"] if s not in sites]
        if unknown:
            raise UsageError(f"sites {unknown} not in {fed.name} (sites: {', '.join(sites)})")
        sites = [s for s in sites if s in cfg["sites"]]
    if cfg["no_unseen"]:
        return sites, None
    u = cfg["unseen"]
    if not -len(sites) <= u < len(sites):
        raise UsageError(f"unseen={u} out of range for {len(sites)} sites ({', '.join(sites)})")
    unseen = sites[u]
    train = [s for s in sites if s != unseen]
    if not train:
        raise UsageError("no training site left after holding out the unseen site")
    return train, unseen


def client_sources(cfg: dict, fed, train_sites):
    from fedfms_jax.data.federations import ConcatSource
    if cfg["mode"] == "centralized":
        return ["pooled"], [ConcatSource([fed.train(s) for s in train_sites])]
    return list(train_sites), [fed.train(s) for s in train_sites]


def make_loader(cfg: dict, sources):
    from fedfms_jax.data.pipeline import FederatedLoader
    steps = cfg["local_steps"]
    return FederatedLoader(sources, cfg["batch_size"], seed=cfg["seed"],
                           mode="steps" if steps > 0 else "epoch", steps=steps or None, num_workers=2)


def round_batches(loader, cfg: dict, round_: int) -> dict:
    """Batches of training round `round_` (1-based): local_epochs loader rounds stacked."""
    e = cfg["local_epochs"]
    parts = [loader.round_batches((round_ - 1) * e + i) for i in range(e)]
    return parts[0] if e == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ------------------------------------------------------------------------------ engine
def client_optimizer(cfg: dict):
    if cfg["weight_decay"]:
        return optax.adamw(cfg["lr"], b1=cfg["b1"], b2=cfg["b2"], weight_decay=cfg["weight_decay"])
    return optax.adam(cfg["lr"], b1=cfg["b1"], b2=cfg["b2"])


def make_engine(cfg: dict, model, mesh=None):
    """The round engine for `cfg`; `mesh` defaults to every device (the plan passes one)."""
    from fedfms_jax.federated.round import FederatedEngine
    from fedfms_jax.federated.server_optim import server_optimizer
    forward = model_init.make_forward(cfg["model"]["pixel_norm"], from_embeddings=cfg["cache_embeddings"],
                                      mask_size=cfg["image_size"] // 4)
    try:
        server = server_optimizer(cfg["server_optimizer"], lr=cfg["server_lr"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # sequential: the engine trains a device's clients one at a time inside the jitted round.
    chunk = {"client_chunk": 1} if cfg["client_loop"] == "sequential" else {}
    return FederatedEngine(model, cfg["partition"] or cfg["method"], forward=forward,
                           client_optimizer=client_optimizer(cfg), server_optimizer=server,
                           loss="bce", pos_weight=cfg["pos_weight"], compute_dtype=cfg["model"]["dtype"],
                           aggregate_clients=cfg["mode"] != "local", mesh=mesh, **chunk)


def to_tree(state) -> dict:
    """FedState -> plain dict for orbax."""
    return state._asdict()


def from_tree(tree, like):
    return type(like)(**tree)


@dataclasses.dataclass
class Run:
    cfg: dict
    fed: Any
    train_sites: list[str]
    unseen_site: str | None
    clients: list[str]          # names of the engine's clients ("pooled" when centralized)
    engine: Any
    model_info: dict
    state: Any = None           # FedState (local mode: the sites' models in client_params)
    round: int = 0
    eval_step: Any = None

    @property
    def local(self) -> bool:
        return self.cfg["mode"] == "local"

    def init_state(self):
        return self.engine.init(len(self.clients))

    def global_trainable(self, site: str | None = None):
        """The trainable params to evaluate `site` with: the global model; in local mode the
        site's own model, or the sample-weighted mean of the sites' models for any other."""
        if not self.local:
            return self.state.global_params
        per_site = self.state.client_params
        if site in self.clients:
            i = self.clients.index(site)
            return jax.tree.map(lambda x: x[i], per_site)
        w = np.asarray([len(self.fed.train(s)) for s in self.clients], np.float64)
        w = w / w.sum()
        return jax.tree.map(lambda x: sum(wi * x[i] for i, wi in enumerate(w)), per_site)

    def params_for_site(self, site: str | None = None):
        return self.global_trainable(site), self.engine.frozen, self.engine.rest

    def abstract_tree(self):
        def abstract(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        return jax.tree.map(abstract, to_tree(self.state))

    # Checkpoint layout: {"fed": engine state(s), "rng": key data} + JSON meta.
    def save(self, ckpt: Checkpointer, round_: int, rng, meta: dict) -> None:
        ckpt.save(round_, {"fed": to_tree(self.state), "rng": rng}, meta)

    def restore(self, ckpt: Checkpointer, round_: int):
        """Load checkpoint `round_` into self.state; returns (rng key data, meta)."""
        rng_like = jax.ShapeDtypeStruct((2,), np.uint32)
        tree, meta = ckpt.restore(round_, {"fed": self.abstract_tree(), "rng": rng_like})
        self.state = from_tree(tree["fed"], self.state)
        self.round = int(meta["round"])
        return tree["rng"], meta


def build_run(cfg: dict) -> Run:
    """Data, model (weights per init_from), engine and a fresh initial state."""
    fed = load_federation(cfg)
    train_sites, unseen = resolve_sites(cfg, fed)
    clients, _ = client_sources(cfg, fed, train_sites)
    _, model, info = model_init.build_model(cfg)
    engine = make_engine(cfg, model)
    if cfg["cache_embeddings"]:
        from fedfms_jax import embedding_cache as ec
        ec.check_encoder_frozen(engine.partition)
        fed = ec.EmbeddedFederation(fed, ec.Embedder(model, cfg["model"]["pixel_norm"]))
    info["trainable_params"] = engine.partition.count(True)
    info["frozen_params"] = engine.partition.count(False)
    run = Run(cfg, fed, train_sites, unseen, clients, engine, info)
    run.state = run.init_state()
    run.eval_step = make_eval_step(engine.graphdef, engine.partition, engine.forward)
    return run


def restore_run(workdir: Path, round_: int | None = None) -> Run:
    """A Run rebuilt from a work dir's config.json, its state from checkpoint `round_` (latest)."""
    enable_compilation_cache()
    cfg = wd.load_config(workdir)
    run_config.validate(cfg)
    ckpt_dir = Path(workdir) / wd.CKPT_DIR
    if not ckpt_dir.is_dir():
        raise UsageError(f"{workdir} has no checkpoints yet")
    run = build_run(cfg)
    ckpt = Checkpointer(ckpt_dir, keep=cfg["checkpoint_keep"])
    rounds = ckpt.all_rounds()
    if not rounds:
        raise UsageError(f"{workdir} has no checkpoints yet")
    target = rounds[-1] if round_ is None else round_
    if target not in rounds:
        raise UsageError(f"{workdir} has no checkpoint of round {target} (have {rounds})")
    run.restore(ckpt, target)
    ckpt.close()
    return run
