"""A Flower federation on localhost for tests: SuperLink + SuperNodes as real processes,
TLS with a throwaway CA, SuperNode authentication with registered EC keys, and beside each
SuperNode its long-lived site worker (`fedfms_jax.deploy.site_worker`), as a hospital runs them.

Every process gets its own session (process group) so it is killed with its children
(the ServerApp / ClientApp processes Flower spawns); `close()` kills whatever is left.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "deploy" / "flower"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


class LocalFederation:
    def __init__(self, root: Path, nodes: list[dict[str, str]], *, auth: bool = True):
        """nodes: each SuperNode's node config (site, manual-dir, data-dir, ...)."""
        from fedfms_jax.deploy import tls
        self.root = Path(root)
        self.nodes = [dict(n) for n in nodes]
        self.sites = [n["site"] for n in nodes]
        self.auth = auth
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.certs = tls.make_certificates(self.root / "certs")
        self.keys = [tls.make_node_keys(self.root / "certs", f"node_{i}") for i in range(len(nodes))]
        self.port = free_port()
        self.home = self.root / "flwr_home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "hospitals"\n\n[superlink.hospitals]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs["ca"]}"\n')
        # FLWR_SUPEREXEC_TASK_POLL_INTERVAL: a node starts its ClientApp 0.1 s after a
        # message arrives instead of up to 1 s.
        self.env = dict(os.environ, FLWR_HOME=str(self.home), PYTHONUNBUFFERED="1",
                        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",
                        JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.env.pop("XLA_FLAGS", None)  # one CPU device per hospital process

    # ------------------------------------------------------------------ processes
    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        f = open(log, "ab")
        p = subprocess.Popen(argv, cwd=self.root, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        f.close()
        self.procs[name] = p
        return p

    def start_superlink(self) -> None:
        argv = [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs["ca"]),
                "--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
                "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        # In-memory state: a file database hit "database is locked" on a loaded machine.
        if self.auth:
            argv.append("--enable-supernode-auth")
        self._start("superlink", argv)
        _wait_port(self.port, 60)
        if self.auth:
            for _, pub in self.keys:
                self.flwr(["supernode", "register", str(pub), "hospitals"], timeout=60)

    def start_supernode(self, i: int) -> None:
        key = self.keys[i][0] if self.auth else None
        self.start_node(f"supernode_{i}", self.nodes[i], key)

    def start_node(self, name: str, node_config: dict[str, str], private_key: Path | None) -> subprocess.Popen:
        """A SuperNode with `node_config` and its site worker, presenting `private_key`
        (None: no key of its own)."""
        sock = self.root / f"{name}.sock"
        self._start(f"{name}_worker", [sys.executable, "-m", "fedfms_jax.deploy.site_worker", "--socket", str(sock)])
        config = " ".join(f"{k}='{v}'" for k, v in dict(node_config, worker=str(sock)).items())
        argv = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(self.certs["ca"]),
                "--port", str(free_port()), "--node-config", config]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        return self._start(name, argv)

    def kill(self, name: str) -> None:
        """SIGKILL a started process, its process group and every descendant (Flower
        starts the ServerApp / ClientApp processes in sessions of their own)."""
        if not name.endswith("_worker"):
            self.kill(f"{name}_worker")  # the hospital machine goes down as a whole
        p = self.procs.get(name)
        if p is None:
            return
        pids = _descendants(p.pid)
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=10)

    def flwr(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        out = subprocess.run([str(BIN / "flwr"), *args], cwd=self.root, env=self.env, capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def submit(self, run_config: dict) -> None:
        """`flwr run` the app (returns once the SuperLink has the run)."""
        items = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        self.flwr(["run", str(APP_DIR), "hospitals", "--run-config", items], timeout=120)

    def run_app(self, run_config: dict, timeout: float, wait_for: Path) -> None:
        """`flwr run` the app and wait until `wait_for` (results.json) appears."""
        self.submit(run_config)
        self.wait_file(wait_for, timeout)

    def wait_file(self, wait_for: Path, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if wait_for.exists():
                return
            dead = [n for n, p in self.procs.items() if n == "superlink" and p.poll() is not None]
            if dead:
                raise RuntimeError(f"superlink exited:\n{self.tail('superlink')}")
            time.sleep(0.5)
        raise TimeoutError(f"run did not finish in {timeout}s:\n{self.tail('superlink')}")

    def tail(self, name: str, n: int = 4000) -> str:
        log = self.logs.get(name)
        return log.read_text(errors="replace")[-n:] if log and log.exists() else ""

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        # Orphans re-parented away from our tree still name our private directory.
        for pid in _pids_mentioning(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _parents() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                out[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _descendants(pid: int) -> list[int]:
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        cur = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == cur]
        found += kids
        frontier += kids
    return found


def _pids_mentioning(text: str) -> list[int]:
    me = os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != me:
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace('"', '\\"') + '"'
