"""Shared pieces for the training CLI tests: a tiny finished run, and a way to snapshot dirs."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config", str(REPO / "configs" / "synthetic.py") + ":tiny=true"]
# Tests that use the tiny run share one xdist worker, so that it trains once per session.
TINY_RUN_GROUP = pytest.mark.xdist_group("tiny_run")


def snapshot(path: Path) -> dict:
    """Every file under `path` -> (sha256, size, mtime_ns): equal snapshots = untouched dir."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(path))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size,
                                             st.st_mtime_ns)
        else:
            out[str(p.relative_to(path))] = "dir"
    return out


def _module_env(env_extra=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(env_extra or {})
    return env


def run_module(module: str, args, env_extra=None, timeout=1800):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=_module_env(env_extra),
                          capture_output=True, text=True, timeout=timeout)


def start_module(module: str, args, log: Path) -> subprocess.Popen:
    """`python -m module args` in the background, stdout and stderr into `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=_module_env(),
                                stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 2-round tiny run (in-process); returns its work dir."""
    from fedfms_jax import train
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    code = train.main([*TINY, "--workdir", str(workdir)])
    assert code == 0
    return workdir
