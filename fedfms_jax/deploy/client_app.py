"""The hospital side: a Flower ClientApp (one per SuperNode, one site each).

The SuperNode of a hospital is started with its site and data location:

    flower-supernode ... --node-config "site='BIDMC' manual-dir='/data/prostate'"

Messages (all carry the run's plain config as JSON, so every site trains under exactly
the server's config):
  query     -> this node's site, its number of training samples, whether it trains
  train     -> global trainable leaves in, update (trained - global) leaves out, after
               optional client-level DP (clip + Gaussian noise); under SecAgg+ the same
               handler answers Flower's legacy fit format inside `secaggplus_mod`
  evaluate  -> metric block of the site (validation split; all data if unseen)
The client optimizer state is kept in the node's Context state between rounds, as the
simulation keeps each client's optimizer state.
"""
from __future__ import annotations

import json

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfms_jax.deploy import protocol as proto

app = ClientApp()


def _node_setting(context: Context, key: str, default: str = "") -> str:
    return str(context.node_config.get(key, default) or default)


def _trainer(cfg: dict, context: Context):
    from fedfms_jax.deploy.site import SiteTrainer
    site = _node_setting(context, "site")
    if not site:
        raise ValueError("this SuperNode has no site: start it with --node-config \"site='NAME' ...\"")
    return SiteTrainer(cfg, site, data_dir=_node_setting(context, "data-dir"),
                       manual_dir=_node_setting(context, "manual-dir"))


@app.query()
def query(msg: Message, context: Context) -> Message:
    from fedfms_jax.deploy.site import site_info
    cfg = json.loads(str(msg.content.config_records[proto.CONFIG]["cfg"]))
    info = site_info(cfg, _node_setting(context, "site"), data_dir=_node_setting(context, "data-dir"),
                     manual_dir=_node_setting(context, "manual-dir"))
    return Message(RecordDict({proto.INFO: ConfigRecord(info)}), reply_to=msg)


def _secagg_when_asked(msg: Message, ctxt: Context, call_next):
    """Flower's SecAgg+ mod for SecAgg+ rounds; plain train messages pass straight on."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _local_round(cfg: dict, round_: int, global_leaves, context: Context):
    """Train, apply DP, store optimizer state. Returns (update leaves, metrics dict)."""
    from fedfms_jax.deploy import dp as dp_lib
    from fedfms_jax.deploy.payload import leaves_to_tree, opaque_to_record, record_to_opaque
    trainer = _trainer(cfg, context)
    if not trainer.trains:
        raise ValueError(f"site {trainer.site} does not train in this run")
    opt_state = None
    if proto.OPT_STATE in context.state.array_records:
        like = trainer.init_opt_state(leaves_to_tree(trainer.partition, global_leaves))
        opt_state = record_to_opaque(context.state.array_records[proto.OPT_STATE], like)
    update, opt_state, stats = trainer.train(global_leaves, round_, opt_state)
    context.state.array_records[proto.OPT_STATE] = opaque_to_record(opt_state)
    metrics = {"loss": stats["loss"], "steps": stats["steps"], "finite": int(stats["finite"]),
               "num_samples": trainer.num_samples}
    dp = proto.dp_config(cfg)
    if dp.enabled:
        update, norm, scale = dp_lib.clip_and_noise(update, dp, np.random.default_rng())
        metrics.update(update_norm=norm, clip_scale=scale)
    trainer.close()
    return update, metrics, trainer.site


@app.train(mods=[_secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    if "fitins.parameters" in msg.content.array_records:  # SecAgg+: Flower's legacy fit format
        return _train_legacy(msg, context)
    conf = msg.content.config_records[proto.CONFIG]
    cfg, round_ = json.loads(str(conf["cfg"])), int(conf["round"])
    global_leaves = list(msg.content.array_records[proto.GLOBAL].to_numpy_ndarrays())
    update, metrics, site = _local_round(cfg, round_, global_leaves, context)
    from fedfms_jax.deploy.payload import leaves_to_record
    names = list(msg.content.array_records[proto.GLOBAL].keys())
    content = RecordDict({proto.UPDATE: leaves_to_record(names, update),
                          proto.METRICS: MetricRecord(metrics),
                          proto.INFO: ConfigRecord({"site": site})})
    return Message(content, reply_to=msg)


def _train_legacy(msg: Message, context: Context) -> Message:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg, round_ = json.loads(str(fitins.config["cfg"])), int(fitins.config["round"])
    update, metrics, site = _local_round(cfg, round_, parameters_to_ndarrays(fitins.parameters), context)
    metrics["site"] = site
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(metrics["num_samples"]), metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


@app.query("echo")
def echo(msg: Message, context: Context) -> Message:
    """Payload check: hash what arrived and send it all back."""
    from fedfms_jax.deploy.payload import digest
    record = msg.content.array_records[proto.GLOBAL]
    leaves = record.to_numpy_ndarrays()
    info = ConfigRecord({"sha256": digest(leaves), "bytes": int(sum(x.nbytes for x in leaves))})
    return Message(RecordDict({proto.UPDATE: record, proto.INFO: info}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    conf = msg.content.config_records[proto.CONFIG]
    cfg = json.loads(str(conf["cfg"]))
    trainer = _trainer(cfg, context)
    block = trainer.evaluate(list(msg.content.array_records[proto.GLOBAL].to_numpy_ndarrays()))
    content = RecordDict({proto.INFO: ConfigRecord({"site": trainer.site, "block": json.dumps(block)})})
    return Message(content, reply_to=msg)


__all__ = ["app", "ArrayRecord"]
