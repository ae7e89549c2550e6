"""Everything a run is made of, built from its config: data, model, engine, state.

Used by `train` (fresh or resumed) and by `evaluate` (the run's data and scoring for a
model loaded on its own, see `trained_model`), so that both see the same sites, splits
and forward pass.

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
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedfms_jax import checkpoint, model_init, run_config, workdir as wd
from fedfms_jax.cli_errors import UsageError
from fedfms_jax.evaluation import make_eval_step
from fedfms_jax.federated.partition import make_partition


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
def load_federation(cfg: dict, only_sites: tuple[str, ...] = ()):
    """The config's federation; `only_sites`: those sites alone (a hospital's own data:
    nothing else is read, and a site's split is the one it has in the whole federation)."""
    from fedfms_jax.data.federations import builder_options, get_federation
    if cfg["federation"] == "synthetic":
        kw = dict(num_sites=cfg["synthetic_sites"], images_per_site=cfg["synthetic_images"],
                  num_classes=cfg["num_classes"], seed=cfg["seed"])
    else:  # the protocol's data fields (run_config.PROTOCOL_DATA_FIELDS) as builder options
        kw = builder_options(cfg["federation"], fundus_disc=cfg["fundus_disc"], val_split=cfg["val_split"],
                             slice_orientation=cfg["slice_orientation"], resize=cfg["resize"])
        kw.update({"sites": tuple(only_sites)} if only_sites else {})
    try:
        fed = get_federation(cfg["federation"], image_size=cfg["image_size"],
                             data_dir=cfg["data_dir"] or None, manual_dir=cfg["manual_dir"] or None, **kw)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"federation {cfg['federation']!r}: {exc}") from None
    if fed.num_classes != cfg["num_classes"]:
        raise UsageError(f"config num_classes={cfg['num_classes']} but {fed.name} has {fed.num_classes} classes")
    if only_sites and cfg["federation"] == "synthetic":  # made in memory: keep the asked sites
        fed = dataclasses.replace(fed, sites=[s for s in fed.sites if s in only_sites],
                                  splits={s: fed.splits[s] for s in only_sites})
    return fed


def site_names(cfg: dict) -> list[str]:
    """The federation's sites in client order, known without its data (the registry's;
    synthetic: the config's count)."""
    from fedfms_jax.data.registry import federation_info
    if cfg["federation"] == "synthetic":
        return [f"site{i}" for i in range(cfg["synthetic_sites"])]
    sites = list(federation_info(cfg["federation"]).sites)
    if not sites:
        raise UsageError(f"federation {cfg['federation']!r} takes its sites from its data: "
                         "they are not known without it")
    return sites


def resolve_sites(cfg: dict, fed) -> tuple[list[str], str | None]:
    return choose_sites(cfg, list(fed.sites), fed.name)


def choose_sites(cfg: dict, sites: list[str], name: str) -> tuple[list[str], str | None]:
    """(training sites, unseen site) among federation `name`'s `sites` per cfg's sites,
    unseen and no_unseen."""
    if cfg["sites"]:
        unknown = [s for s in cfg["sites"] if s not in sites]
        if unknown:
            raise UsageError(f"sites {unknown} not in {name} (sites: {', '.join(sites)})")
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
def client_lr(cfg: dict):
    """The clients' learning rate: cfg's lr, or a schedule over a client's own optimizer
    step count (kept in its optimizer state across rounds, so it runs through the rounds)."""
    lr = cfg["lr"]
    if cfg["lr_schedule"] == "constant":
        return lr
    per_round = cfg["local_steps"] * cfg["local_epochs"]  # round_batches stacks local_epochs loader rounds
    warmup = cfg["lr_warmup_rounds"] * per_round
    total = cfg["rounds"] * per_round

    def warmup_cosine(count):
        t = count.astype(jnp.float32)
        # Step t (0-based) of the warm-up takes (t + 1) / warmup of lr: no step at lr 0.
        ramp = lr * (t + 1.0) / max(warmup, 1)
        frac = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = 0.5 * lr * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(t < warmup, ramp, cosine)

    return warmup_cosine


def client_optimizer(cfg: dict):
    lr = client_lr(cfg)
    if cfg["weight_decay"]:
        return optax.adamw(lr, b1=cfg["b1"], b2=cfg["b2"], weight_decay=cfg["weight_decay"])
    return optax.adam(lr, b1=cfg["b1"], b2=cfg["b2"])


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
                           loss=cfg["loss"], pos_weight=cfg["pos_weight"], compute_dtype=cfg["model"]["dtype"],
                           aggregate_clients=cfg["mode"] != "local", mesh=mesh, **chunk)


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
        return checkpoint.sample_weighted_mean(per_site, [len(self.fed.train(s)) for s in self.clients])

    def params_for_site(self, site: str | None = None):
        return self.global_trainable(site), self.engine.frozen, self.engine.rest


def build_run(cfg: dict) -> Run:
    """Data, model (weights per init_from), engine and a fresh initial state."""
    fed = load_federation(cfg)
    train_sites, unseen = resolve_sites(cfg, fed)
    clients, _ = client_sources(cfg, fed, train_sites)
    # adapter_init="torch_mean": one draw per training client, averaged (centralized: one).
    _, model, info = model_init.build_model(cfg, adapter_draws=len(clients))
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
    """A Run rebuilt from a work dir's config.json (data included), its state from
    checkpoint `round_` (latest). For inspecting a run's full state; a model alone is
    loaded with `trained_model.load_trained`."""
    enable_compilation_cache()
    cfg = wd.load_config(workdir)
    run_config.validate(cfg)
    try:
        ckpt = checkpoint.open_workdir(workdir)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with ckpt:
        try:
            target = checkpoint.pick_round(ckpt, round_, workdir)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        run = build_run(cfg)
        run.state, _, meta = ckpt.restore_run(target, run.state)
    run.round = int(meta["round"])
    return run


@dataclasses.dataclass
class Scoring:
    """What scores a model on a run's data: the sites, and the pieces of a jitted eval step."""
    fed: Any
    train_sites: list[str]
    unseen_site: str | None
    graphdef: Any
    partition: Any
    forward: Any
    params_for_site: Any  # site -> (trainable, frozen, rest)


def scoring(cfg: dict, model, per_site=None) -> Scoring:
    """The run's data and `model` split as the engine splits it. `per_site`: the sites'
    own trainable trees stacked on a leading axis (in training-site order) when the sites
    trained alone; each scores itself with its own, the unseen site with `model`."""
    fed = load_federation(cfg)
    train_sites, unseen = resolve_sites(cfg, fed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    partition = make_partition(params, cfg["partition"] or cfg["method"])
    trainable, frozen = partition.split(params)
    own = {}
    if per_site is not None:
        stacked = jax.tree.map(jax.numpy.asarray, per_site)
        own = {s: jax.tree.map(lambda x, i=i: x[i], stacked) for i, s in enumerate(train_sites)}
    if cfg["cache_embeddings"]:
        from fedfms_jax import embedding_cache as ec
        fed = ec.EmbeddedFederation(fed, ec.Embedder(model, cfg["model"]["pixel_norm"]))
    forward = model_init.make_forward(cfg["model"]["pixel_norm"], from_embeddings=cfg["cache_embeddings"],
                                      mask_size=cfg["image_size"] // 4)

    def params_for_site(site=None):
        return own.get(site, trainable), frozen, rest

    return Scoring(fed, train_sites, unseen, graphdef, partition, forward, params_for_site)
