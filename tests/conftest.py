"""Test setup shared by every test.

Four fake CPU devices so that sharding code runs over a real multi-device mesh.
The flag must be set before jax is imported anywhere.

One persistent compilation cache per run, made afresh and passed on through the
environment, serves both xdist workers and the training CLI and Flower processes the
tests start (which would otherwise use the user's cache under ~/.cache). The suite then
neither writes into the user's cache nor runs faster because an earlier run filled it:
its time is that of a new machine.
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process of the run
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE = tempfile.mkdtemp(prefix="fedfms-test-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
else:
    _OWN_CACHE = None

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare with float32 PyTorch: keep XLA from lowering matmul precision.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _OWN_CACHE:  # only the process that made the cache removes it
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def stub_torchvision():
    """segment_anything imports torchvision but its model code never uses it; the CPU
    torch here cannot load PyPI's torchvision. The reference package's stand-ins serve
    the tests too."""
    from fedfms_jax.reference.torch_fedfms_decoder import ensure_segment_anything_importable

    ensure_segment_anything_importable()


@pytest.fixture(scope="session")
def four_devices():
    devices = jax.devices()
    assert len(devices) == 4, "conftest must set 4 fake CPU devices before jax is imported"
    return devices

