"""Test setup shared by every test.

Four fake CPU devices so that sharding code runs over a real multi-device mesh.
The flag must be set before jax is imported anywhere.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare with float32 PyTorch: keep XLA from lowering matmul precision.
jax.config.update("jax_default_matmul_precision", "highest")


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

