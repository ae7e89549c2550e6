"""Test setup shared by every test.

Four fake CPU devices so that sharding code runs over a real multi-device mesh.
The flag must be set before jax is imported anywhere.
"""
import importlib.util
import os
import sys
import types

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare with float32 PyTorch: keep XLA from lowering matmul precision.
jax.config.update("jax_default_matmul_precision", "highest")


def stub_torchvision():
    """segment_anything imports torchvision but its model code never uses it;
    the CPU torch here cannot load PyPI's torchvision, so give it an empty module."""
    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        tv.transforms.functional.resize = None
        tv.transforms.functional.to_pil_image = None
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tv.transforms
        sys.modules["torchvision.transforms.functional"] = tv.transforms.functional
        tv.ops = types.ModuleType("torchvision.ops")
        tv.ops.boxes = types.ModuleType("torchvision.ops.boxes")
        tv.ops.boxes.batched_nms = None
        tv.ops.boxes.box_area = None
        sys.modules["torchvision.ops"] = tv.ops
        sys.modules["torchvision.ops.boxes"] = tv.ops.boxes


@pytest.fixture(scope="session")
def four_devices():
    devices = jax.devices()
    assert len(devices) == 4, "conftest must set 4 fake CPU devices before jax is imported"
    return devices


# The Flower deployment tests need the `flower` extra (pip install -e '.[test,flower]')
# and start real SuperLink/SuperNode processes; without flwr they are not collected.
if importlib.util.find_spec("flwr") is None:
    collect_ignore = ["deploy"]
