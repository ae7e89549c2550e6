"""The hospital side: a Flower ClientApp (one per SuperNode, one site each).

The SuperNode of a hospital is started with its site, its data and (optionally) its own
copy of the starting weights and its long-lived site worker (see `site_worker`):

    flower-supernode ... --node-config "site='BIDMC' manual-dir='/data/prostate' \
        data-dir='/data/tfds' weights-dir='/data/weights/sam_vit_b' worker='/srv/fedfms/site.sock'"

The node reads only its own site (manual-dir/<site>/...). Messages (all carry the run's
plain config as JSON, so every site trains under exactly the server's config, and the
sha256 of the server's starting weights, see `start_weights`):
  query     -> this node's site, its number of training samples, whether it trains; or
               "refused" with one line (no data in the expected layout, other weights)
  train     -> global trainable leaves in, update (trained - global) leaves out, after
               optional client-level DP (clip + Gaussian noise); under SecAgg+ the same
               handler answers Flower's legacy fit format inside `secaggplus_mod`
  evaluate  -> metric block of the site (validation split; all data if unseen)
The client optimizer state is kept in the node's Context state between rounds (an
ArrayRecord of its flattened leaves "0", "1", ...; the site worker rebuilds the tree), as
the simulation keeps each client's optimizer state.
"""
from __future__ import annotations

import json

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfms_jax.deploy import protocol as proto

app = ClientApp()

# node config key -> request field
_NODE_KEYS = {"site": "site", "data-dir": "data_dir", "manual-dir": "manual_dir", "weights-dir": "weights_dir"}


def _ask(context: Context, kind: str, conf, **fields) -> dict:
    """Send one request to this node's site worker (in-process without `worker`)."""
    from fedfms_jax.deploy import site_worker
    node = {field: str(context.node_config.get(key, "") or "") for key, field in _NODE_KEYS.items()}
    request = dict(fields, kind=kind, cfg=str(conf["cfg"]), node=node,
                   weights_sha256=str(conf.get(proto.WEIGHTS_SHA256, "")))
    worker = str(context.node_config.get("worker", "") or "")
    answer = site_worker.call(worker, request) if worker else site_worker.handle(request)
    if "error" in answer:
        raise RuntimeError(answer["error"])
    if "refused" in answer:
        print(f"fedfms node refused: {answer['refused']}", flush=True)
        if kind != "query":
            raise ValueError(answer["refused"])
    return answer


@app.query()
def query(msg: Message, context: Context) -> Message:
    answer = _ask(context, "query", msg.content.config_records[proto.CONFIG])
    info = {"refused": answer["refused"], "site": str(context.node_config.get("site", ""))} \
        if "refused" in answer else answer["info"]
    return Message(RecordDict({proto.INFO: ConfigRecord(info)}), reply_to=msg)


def _secagg_when_asked(msg: Message, ctxt: Context, call_next):
    """Flower's SecAgg+ mod for SecAgg+ rounds; plain train messages pass straight on."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _local_round(conf, global_leaves, context: Context):
    """Train, apply DP, store optimizer state. Returns (update leaves, metrics dict, site)."""
    from fedfms_jax.deploy import dp as dp_lib
    stored = context.state.array_records.get(proto.OPT_STATE)
    opt_state = None if stored is None else [stored[str(i)].numpy() for i in range(len(stored))]
    answer = _ask(context, "train", conf, round=int(conf["round"]), opt_state=opt_state,
                  **{"global": [np.asarray(x) for x in global_leaves]})
    context.state.array_records[proto.OPT_STATE] = proto.leaves_to_record(
        [str(i) for i in range(len(answer["opt_state"]))], answer["opt_state"])
    stats, update = answer["stats"], answer["update"]
    metrics = {"loss": stats["loss"], "steps": stats["steps"], "finite": int(stats["finite"]),
               "num_samples": answer["num_samples"]}
    dp = proto.dp_config(json.loads(str(conf["cfg"])))
    if dp.enabled:
        update, norm, scale = dp_lib.clip_and_noise(update, dp, np.random.default_rng())
        metrics.update(update_norm=norm, clip_scale=scale)
    return update, metrics, answer["site"]


@app.train(mods=[_secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    if "fitins.parameters" in msg.content.array_records:  # SecAgg+: Flower's legacy fit format
        return _train_legacy(msg, context)
    conf = msg.content.config_records[proto.CONFIG]
    record = msg.content.array_records[proto.GLOBAL]
    update, metrics, site = _local_round(conf, list(record.to_numpy_ndarrays()), context)
    content = RecordDict({proto.UPDATE: proto.leaves_to_record(list(record.keys()), update),
                          proto.METRICS: MetricRecord(metrics),
                          proto.INFO: ConfigRecord({"site": site})})
    return Message(content, reply_to=msg)


def _train_legacy(msg: Message, context: Context) -> Message:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    update, metrics, site = _local_round(fitins.config, parameters_to_ndarrays(fitins.parameters), context)
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
    answer = _ask(context, "evaluate", msg.content.config_records[proto.CONFIG],
                  **{"global": list(msg.content.array_records[proto.GLOBAL].to_numpy_ndarrays())})
    content = RecordDict({proto.INFO: ConfigRecord({"site": answer["site"], "block": json.dumps(answer["block"])})})
    return Message(content, reply_to=msg)


__all__ = ["app", "ArrayRecord"]
