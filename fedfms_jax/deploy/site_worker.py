"""A hospital's long-lived site process: the model built and compiled once, for every message.

Flower 1.42 runs each message a SuperNode receives in a fresh ClientApp process:
`flwr-clientapp` is given one task token, runs that task and exits, whether the SuperNode
starts it (`--isolation subprocess`) or a separate `flower-superexec` does
(`--isolation process`); its prestarted workers serve one task each as well. No module
state survives from one message to the next, so a ClientApp on its own builds the model,
opens the data and loads its compiled programs again for every message.

This process keeps them. Started once beside the SuperNode,

    python -m fedfms_jax.deploy.site_worker --socket /srv/fedfms/site.sock

it answers the ClientApp's requests over that Unix socket (node config
`worker='/srv/fedfms/site.sock'`) one at a time, keeping a SiteTrainer per (config, site,
data folders, weights) while it runs. The socket's key file (<socket>.key, mode 0600)
authenticates the ClientApp before anything is read from it. Without `worker` in the node
config the ClientApp answers the same requests itself (`handle`).

Requests are dicts: kind ("query" | "train" | "evaluate"), cfg (the run's config as JSON),
node (site, data_dir, manual_dir, weights_dir), weights_sha256 (the server's), and for
train/evaluate: round, global (trainable leaves), opt_state (leaves or None). A node that
cannot take part answers {"refused": one line naming what is wrong}.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import sys
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

KEEP = 2  # trainers kept (each holds a model and its frozen weights)
_TRAINERS: collections.OrderedDict = collections.OrderedDict()


def trainer_for(cfg: dict, node: dict):
    """The SiteTrainer of (cfg, node), built on first use; deployment options (cfg["deploy"])
    do not change it, so runs that differ only there share it."""
    from fedfms_jax.deploy.site import SiteTrainer
    key = json.dumps([{k: v for k, v in cfg.items() if k != "deploy"}, node], sort_keys=True)
    if key in _TRAINERS:
        _TRAINERS.move_to_end(key)
        return _TRAINERS[key]
    trainer = SiteTrainer(cfg, node["site"], data_dir=node.get("data_dir", ""),
                          manual_dir=node.get("manual_dir", ""), weights_dir=node.get("weights_dir", ""))
    _TRAINERS[key] = trainer
    while len(_TRAINERS) > KEEP:
        _TRAINERS.popitem(last=False)[1].close()
    return trainer


def handle(request: dict) -> dict:
    """Answer one request (see the module docstring)."""
    from fedfms_jax.cli_errors import UsageError
    from fedfms_jax.data.errors import DataError
    from fedfms_jax.deploy.start_weights import mismatch
    cfg, node = json.loads(request["cfg"]), request["node"]
    if not node.get("site"):
        return {"refused": "this SuperNode has no site: start it with --node-config \"site='NAME' ...\""}
    try:
        trainer = trainer_for(cfg, node)
    except DataError as exc:
        return {"refused": exc.message}
    except UsageError as exc:
        return {"refused": str(exc)}
    refusal = mismatch(trainer.weights_sha256, request.get("weights_sha256", ""), trainer.cfg["init_from"])
    if refusal:
        return {"refused": refusal}
    kind = request["kind"]
    if kind == "query":
        return {"info": trainer.info()}
    if kind == "evaluate":
        return {"site": trainer.site, "block": trainer.evaluate(request["global"])}
    if kind == "train":
        return _train(trainer, request)
    raise ValueError(f"unknown request kind {kind!r}")


def _train(trainer, request: dict) -> dict:
    import jax
    from fedfms_jax.deploy.payload import leaves_to_tree
    if not trainer.trains:
        return {"refused": f"site {trainer.site} does not train in this run"}
    opt_state = None
    if request.get("opt_state") is not None:
        like = trainer.init_opt_state(leaves_to_tree(trainer.partition, request["global"]))
        treedef = jax.tree.structure(like)
        if treedef.num_leaves != len(request["opt_state"]):
            raise ValueError(f"stored optimizer state has {len(request['opt_state'])} leaves, "
                             f"expected {treedef.num_leaves}")
        opt_state = jax.tree.unflatten(treedef, request["opt_state"])
    update, opt_state, stats = trainer.train(request["global"], int(request["round"]), opt_state)
    return {"update": update, "opt_state": jax.tree.leaves(opt_state), "stats": stats,
            "site": trainer.site, "num_samples": trainer.num_samples}


# ------------------------------------------------------------------------------ transport
def key_file(socket_path: str | Path) -> Path:
    return Path(f"{socket_path}.key")


def call(socket_path: str, request: dict, wait: float = 60.0) -> dict:
    """Send `request` to the worker at `socket_path` and return its answer (waits up to
    `wait` seconds for a worker that is still starting)."""
    deadline = time.time() + wait
    while True:
        try:
            with Client(socket_path, "AF_UNIX", authkey=key_file(socket_path).read_bytes()) as conn:
                conn.send(request)
                return conn.recv()
        except (FileNotFoundError, ConnectionRefusedError):
            if time.time() > deadline:
                raise RuntimeError(f"no site worker listens on {socket_path}: start "
                                   f"`python -m fedfms_jax.deploy.site_worker --socket {socket_path}`") from None
            time.sleep(0.5)


def serve(socket_path: Path) -> None:
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    key = secrets.token_bytes(32)
    kf = key_file(socket_path)
    kf.unlink(missing_ok=True)
    fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    with Listener(str(socket_path), "AF_UNIX", authkey=key) as listener:
        os.chmod(socket_path, 0o600)
        print(f"site worker listening on {socket_path}", flush=True)
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError) as exc:  # a caller that failed authentication or left
                print(f"site worker: connection refused: {exc}", flush=True)
                continue
            with conn:
                try:
                    request = conn.recv()
                    answer = _answer(request)
                    conn.send(answer)
                except (EOFError, OSError) as exc:  # the ClientApp went away (its node was stopped)
                    print(f"site worker: caller left: {exc}", flush=True)


def _answer(request: dict) -> dict:
    t0 = time.time()
    try:
        answer = handle(request)
    except Exception as exc:  # noqa: BLE001 (reported to the ClientApp, which fails its message)
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    what = answer.get("refused") or answer.get("error") or f"answered in {time.time() - t0:.1f}s"
    print(f"site worker: {request.get('kind')} {request.get('node', {}).get('site')}: {what}", flush=True)
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedfms_jax.deploy.site_worker",
                                     description="A hospital's long-lived site process (see the module docstring).")
    parser.add_argument("--socket", required=True, help="Unix socket path; the node config's worker='...'")
    args = parser.parse_args(argv)
    try:
        serve(Path(args.socket).expanduser().resolve())
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"site worker: cannot listen on {args.socket}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
