"""The coordinating side: a Flower ServerApp run by the SuperLink (`flwr run`).

Run config keys (the app's [tool.flwr.app.config], overridable with --run-config):
  config      the training config, exactly as for `python -m fedfms_jax.train --config`
              (e.g. "configs/prostate.py:method=fedmsa,unseen=2" or "prostate:method=fedmsa");
              a configs/<name>.py not found from the working directory is the library's own
  overrides   space-separated field=value config overrides ("rounds=50 lr=1e-4")
  workdir     where metrics.jsonl, results.json and the orbax checkpoints go; the same
              workdir resumes after a server restart (a different config is refused)
  plus the deployment options of `protocol.DEPLOY_OPTIONS` (secagg, dp-*, evaluate,
  min-nodes, round-timeout, wait-nodes-timeout).

The server reads no hospital's data: it knows the sites by name (the registry). A node
that cannot take part (no data in the expected layout, other starting weights) answers
the query with one line; the server logs "node N (site S) dropped: ..." in server.log and
goes on without it.

Each round: ask new nodes who they are (query), send the global trainable leaves to the
nodes of training sites (train), aggregate the updates that arrive within round-timeout
(weights renormalised over them), step the server optimizer, log, evaluate on the nodes
when due (evaluate), checkpoint.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedfms_jax import config_cli, results, workdir as wd
from fedfms_jax.run_config import validate as validate_training_config
from fedfms_jax.deploy import protocol as proto

app = ServerApp()


LOG_FILE = "server.log"
_log_path: Path | None = None


def log(msg: str) -> None:
    """To the run's Flower log (`flwr log`) and to <workdir>/server.log."""
    line = f"[fedfms-server {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if _log_path is not None:
        with open(_log_path, "a") as f:
            f.write(line + "\n")


def training_config(spec: str, overrides: str):
    """The training config of `spec` (as for `train --config`) with "field=value ..."
    overrides, validated as the training CLI does. The deployment's one use of the config layer."""
    bad = [kv for kv in overrides.split() if "=" not in kv]
    if bad:
        raise ValueError(f"overrides must be field=value, got {bad[0]!r}")
    cfg = config_cli.load_training_config(spec, [tuple(kv.split("=", 1)) for kv in overrides.split()])
    validate_training_config(cfg)
    return cfg


def load_run_config(run_config) -> tuple[dict, Path]:
    """(training config with cfg["deploy"], workdir) from Flower's run config."""
    cfg = training_config(str(run_config.get("config", "configs/synthetic.py")),
                          str(run_config.get("overrides", "")))
    if cfg["mode"] != "federated":
        raise ValueError(f"deployment runs mode=federated only, config has {cfg['mode']!r}")
    cfg["deploy"] = proto.deploy_options(run_config)
    return cfg, Path(str(run_config.get("workdir", "runs/flower")))


class Coordinator:
    def __init__(self, grid: Grid, context: Context):
        from fedfms_jax.deploy.server_state import ServerState
        self.grid, self.context = grid, context
        self.cfg, workdir = load_run_config(context.run_config)
        self.opts = self.cfg["deploy"]
        self.cfg_json = json.dumps(wd.to_plain(self.cfg), sort_keys=True)
        self.state = ServerState(self.cfg, workdir)
        global _log_path
        _log_path = self.state.path / LOG_FILE
        self.nodes: dict[int, dict] = {}  # node id -> site info
        self.refused: dict[int, str] = {}  # node id -> why it takes no part
        log(f"starting weights (init_from={self.cfg['init_from']}, seed {self.cfg['seed']}): "
            f"sha256 {self.state.weights_sha256}")

    # ------------------------------------------------------------------ messaging
    def config_fields(self, round_: int) -> dict:
        return {"cfg": self.cfg_json, "round": round_, proto.WEIGHTS_SHA256: self.state.weights_sha256}

    def _content(self, round_: int, with_global: bool) -> RecordDict:
        rd = RecordDict({proto.CONFIG: ConfigRecord(self.config_fields(round_))})
        if with_global:
            rd[proto.GLOBAL] = proto.leaves_to_record(self.state.partition.trainable_paths, self.state.leaves())
        return rd

    def _send(self, node_ids, message_type: str, round_: int, with_global: bool, timeout: float):
        msgs = [Message(self._content(round_, with_global), dst_node_id=n, message_type=message_type,
                        group_id=str(round_)) for n in node_ids]
        if not msgs:
            return []
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        good = []
        for r in replies:
            if r.has_error():
                log(f"node {r.metadata.src_node_id}: {message_type} failed: {r.error.reason[:300]}")
            else:
                good.append(r)
        return good

    def refresh_nodes(self, round_: int) -> None:
        """Wait for min-nodes connected nodes; forget nodes that left; ask new ones which
        site they are (a hospital that dropped out rejoins here)."""
        wait_for_nodes(self.grid, self.opts["min_nodes"], self.opts["wait_nodes_timeout"])
        live = set(self.grid.get_node_ids())
        self.nodes = {n: i for n, i in self.nodes.items() if n in live}
        new = sorted(live - set(self.nodes) - set(self.refused))
        for r in self._send(new, MessageType.QUERY, round_, False, self.opts["round_timeout"]):
            info = dict(r.content.config_records[proto.INFO])
            if "refused" in info:  # one line from the node: no data in the layout, other weights, ...
                self.refused[r.metadata.src_node_id] = str(info["refused"])
                log(f"node {r.metadata.src_node_id} (site {info.get('site') or '?'}) dropped: {info['refused']}")
                continue
            dup = [n for n, i in self.nodes.items() if i["site"] == info["site"]]
            if dup:  # a restarted hospital: its new node replaces the old one
                for n in dup:
                    self.nodes.pop(n)
            self.nodes[r.metadata.src_node_id] = info
        sites = sorted(i["site"] for i in self.nodes.values())
        log(f"round {round_}: {len(self.nodes)} node(s): {', '.join(sites)}")

    # ------------------------------------------------------------------ rounds
    def train_round(self, round_: int) -> dict:
        trainers = {n: i for n, i in self.nodes.items() if int(i["trains"])}
        if self.opts["secagg"]:
            from fedfms_jax.deploy.secagg import secagg_round
            # SecAgg+ hands over the weighted mean only: the server step on it alone.
            mean, per_client = secagg_round(self, round_, trainers)
            self.state.step([] if mean is None else [mean], [1.0])
            return per_client
        replies = self._send(sorted(trainers), MessageType.TRAIN, round_, True, self.opts["round_timeout"])
        per_client = {}
        updates = []
        for r in replies:
            site = str(r.content.config_records[proto.INFO]["site"])
            m = dict(r.content.metric_records[proto.METRICS])
            per_client[site] = m
            updates.append((site, list(r.content.array_records[proto.UPDATE].to_numpy_ndarrays()),
                            int(m["num_samples"])))
        updates.sort(key=lambda t: self.train_order(t[0]))  # the simulation's client order
        w = self.state.weights([u[2] for u in updates], self.total_samples())
        finite = self.state.step([u[1] for u in updates], w)
        for (site, _, _), f in zip(updates, finite):
            per_client[site]["counted"] = int(bool(f))
        return per_client

    def train_order(self, site: str) -> int:
        """Position of `site` among the training sites (the simulation's client order)."""
        return next((int(i["index"]) for i in self.nodes.values() if i["site"] == site), 1 << 30)

    def total_samples(self) -> int:
        return sum(int(i["num_samples"]) for i in self.nodes.values() if int(i["trains"]))

    def evaluate(self, round_: int) -> dict:
        from fedfms_jax import metrics
        replies = self._send(sorted(self.nodes), MessageType.EVALUATE, round_, True, self.opts["round_timeout"])
        blocks = {}
        for r in replies:
            info = r.content.config_records[proto.INFO]
            blocks[str(info["site"])] = json.loads(str(info["block"]))
        train = {n: i for n, i in self.nodes.items() if int(i["trains"])}
        sites = {i["site"]: blocks[i["site"]] for i in sorted(train.values(), key=lambda i: i["site"])
                 if i["site"] in blocks}
        out = {"sites": sites, "average": metrics.average_blocks(sites)}
        unseen = [i["site"] for i in self.nodes.values() if int(i["unseen"])]
        if unseen and unseen[0] in blocks:
            out["unseen"] = blocks[unseen[0]]
        return out

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        from fedfms_jax.deploy import dp as dp_lib
        st, cfg = self.state, self.cfg
        start = st.restore_latest() + 1
        if start > 1:
            log(f"resuming {st.path} after round {start - 1}")
        wait_for_nodes(self.grid, self.opts["min_nodes"], self.opts["wait_nodes_timeout"])
        records = st.records()
        dp = proto.dp_config(cfg)
        if 0 not in records and self.opts["evaluate"]:
            self.refresh_nodes(0)
            ev = self.evaluate(0)
            st.log_round({"round": 0, "eval": ev, "seconds": 0.0})
        for r in range(start, cfg["rounds"] + 1):
            t0 = time.time()
            self.refresh_nodes(r)
            per_client = self.train_round(r)
            dt = time.time() - t0
            st.train_seconds += dt
            n = len(per_client)
            record = {"round": r, "client_loss": {s: float(m["loss"]) for s, m in sorted(per_client.items())},
                      "comm_bytes": {"up_per_client": st.bytes_each_way, "down_per_client": st.bytes_each_way,
                                     "total": 2 * st.bytes_each_way * n},
                      "participants": sorted(per_client), "seconds": round(dt, 3),
                      "train_seconds": round(st.train_seconds, 3), "secagg": bool(self.opts["secagg"])}
            if dp.enabled:
                record["dp"] = dp_lib.budget_record(dp, r)
            if self.opts["evaluate"] and (r % cfg["eval_every"] == 0 or r == cfg["rounds"]):
                record["eval"] = self.evaluate(r)
            st.log_round(record)  # before the checkpoint: a restart in between redoes this round
            st.save({"sites": sorted(per_client)})
            log(f"round {r}/{cfg['rounds']} done in {dt:.1f}s with {', '.join(sorted(per_client)) or 'no site'}")
        train_sites = sorted(i["site"] for i in self.nodes.values() if int(i["trains"]))
        unseen = next((i["site"] for i in self.nodes.values() if int(i["unseen"])), None)
        extra = {"secagg": bool(self.opts["secagg"]), "engine": "flower"}
        if dp.enabled:
            extra["dp"] = dp_lib.budget_record(dp, cfg["rounds"])
        log(results.summary_table(st.write_results(train_sites, unseen, extra)))
        st.close()
        log(f"results: {st.path}")


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.time() > deadline:
            raise TimeoutError(f"fewer than {count} SuperNode(s) connected after {timeout}s")
        time.sleep(0.5)


def payload_check(grid: Grid, context: Context) -> None:
    """Send a FedSAM-sized trainable subtree to one node and get it back; writes
    <workdir>/payload.json (sizes, hashes, seconds each way together)."""
    from fedfms_jax.deploy import payload as pl
    workdir = Path(str(context.run_config.get("workdir", "runs/flower")))
    workdir.mkdir(parents=True, exist_ok=True)
    encoder = str(context.run_config.get("payload-encoder", "vit_b"))
    paths, shapes = pl.fedsam_payload_spec(encoder)
    leaves = pl.random_leaves(shapes)
    sent = pl.digest(leaves)
    nbytes = int(sum(x.nbytes for x in leaves))
    record = proto.leaves_to_record(paths, leaves)
    del leaves
    wait_for_nodes(grid, 1, float(context.run_config.get("wait-nodes-timeout", 600.0)))
    node = sorted(grid.get_node_ids())[0]
    t0 = time.time()
    msg = Message(RecordDict({proto.GLOBAL: record}), dst_node_id=node, message_type="query.echo", group_id="0")
    replies = list(grid.send_and_receive([msg], timeout=float(context.run_config.get("round-timeout", 600.0))))
    dt = time.time() - t0
    out = {"encoder": encoder, "leaves": len(paths), "params": int(sum(int(np.prod(s)) for s in shapes)),
           "bytes": nbytes, "sent_sha256": sent, "seconds_round_trip": round(dt, 2),
           "max_array_chunk_bytes": _chunk_size()}
    if replies and not replies[0].has_error():
        r = replies[0]
        back = r.content.array_records[proto.UPDATE].to_numpy_ndarrays()
        out.update(node_sha256=str(r.content.config_records[proto.INFO]["sha256"]),
                   node_bytes=int(r.content.config_records[proto.INFO]["bytes"]),
                   returned_sha256=pl.digest(back), returned_bytes=int(sum(x.nbytes for x in back)))
    else:
        out["error"] = replies[0].error.reason if replies else "no reply"
    (workdir / "payload.json").write_text(json.dumps(out, indent=1) + "\n")


def _chunk_size() -> int:
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    return int(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)


@app.main()
def main(grid: Grid, context: Context) -> None:
    if bool(context.run_config.get("payload-check", False)):
        payload_check(grid, context)
        return
    Coordinator(grid, context).run()
