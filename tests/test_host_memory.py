"""retain_freed_memory: a large buffer freed and allocated again is not faulted in again."""
import subprocess
import sys

import pytest

from fedfms_jax.host_memory import retain_freed_memory

# Allocates, touches and frees 256 MB twice; prints the minor page faults of the second time.
_PROBE = """
import ctypes, resource, sys
from fedfms_jax.host_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 256 << 20
def cycle():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_cycle_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_reused_without_new_page_faults():
    pages = (256 << 20) // 4096
    assert _second_cycle_faults("default") > pages // 2  # glibc unmapped it: every page again
    assert _second_cycle_faults("retain") < pages // 100


def test_elsewhere_it_says_it_did_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert retain_freed_memory() is False
