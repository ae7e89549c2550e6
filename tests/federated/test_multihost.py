"""Two processes on localhost (2 fake CPU devices each, gloo collectives) give the same
global model as one process with 4 devices."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.federated import multihost_worker

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_mesh_matches_single_process(tmp_path, four_devices):
    port = _free_port()
    out = tmp_path / "global.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    try:
        for pid in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.federated.multihost_worker", "--process-id", str(pid),
                 "--num-processes", "2", "--port", str(port), "--out", str(out)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        # Single-process reference while the workers run.
        ref = multihost_worker.run_two_rounds()
        logs = []
        for p in procs:
            text, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(text)
        assert all(p.returncode == 0 for p in procs), "\n----\n".join(t[-3000:] for t in logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    got = {k.replace("|", "/"): v for k, v in np.load(out).items()}
    assert set(got) == set(ref)
    num = sum(float(np.sum((got[k].astype(np.float64) - ref[k]) ** 2)) for k in ref)
    den = sum(float(np.sum(ref[k].astype(np.float64) ** 2)) for k in ref)
    assert (num / den) ** 0.5 <= 1e-5
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
