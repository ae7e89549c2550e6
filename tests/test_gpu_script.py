"""What of benchmarks/gpu.sh can run without a GPU: its syntax, the parity script at a
tiny size (kernels=gpu through XLA here) and the collection of its one JSON."""
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_parses():
    subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], check=True)


def test_parity_of_the_gpu_plan_at_a_tiny_size():
    parity = _load("gpu_parity")
    r = parity.run("vit_tiny", 32, batch=1)
    assert r["ok"], r["checks"]  # which check, by how much
    assert r["checks"]["float32"]["rel_err"] < 1e-5  # same math, float32, HIGHEST precision
    assert 0 < r["checks"]["bfloat16"]["rel_err"] <= 1e-2
    # On this CPU the plan asks XLA (no cuDNN); the GPU run reports the fused calls.
    assert r["checks"]["float32"]["plan_fused_impl"] is None
    assert r["checks"]["bfloat16"]["cudnn_fused_attention_calls"] == 0


def test_parity_fails_when_the_plans_differ(monkeypatch):
    parity = _load("gpu_parity")
    from fedfms_jax.models import kernels as kn

    original = kn.KernelPlan.attend

    def attend(self, q, k, v, rh, rw, scale):
        return original(self, q, k, v, rh, rw, scale * (1.5 if self.name == "gpu" else 1.0))

    monkeypatch.setattr(kn.KernelPlan, "attend", attend)
    r = parity.run("vit_tiny", 32, batch=1)
    assert not r["ok"] and not r["checks"]["float32"]["ok"]


def test_collect_writes_one_document(tmp_path):
    collect = _load("gpu_collect")
    (tmp_path / "machine.txt").write_text("jax 0.11\n")
    (tmp_path / "parity.json").write_text(json.dumps({"ok": True}))
    (tmp_path / "fedmsa_vit_b_1024_bf16.json").write_text(json.dumps(
        {"jax_images_per_s": 100.0, "torch_images_per_s": 10.0, "speedup": 10.0, "compile_s": 50.0,
         "mfu": 0.3, "peak_memory_bytes": 5e10}))
    (tmp_path / "fedsam_vit_b_1024_bf16.log").write_text("timed out")  # ran, wrote no JSON
    doc = collect.collect(tmp_path, 400)
    assert doc["headline"]["fedmsa_vit_b_1024_bf16"]["speedup"] == 10.0
    assert doc["parity"] == {"ok": True} and doc["environment"].startswith("jax")
    assert doc["missing"] == ["fedsam_vit_b_1024_bf16"]
    assert collect.main([str(tmp_path)]) == 1


@pytest.mark.parametrize("part", ["parity", "fedmsa_vit_b_1024_bf16"])
def test_collect_reports_required_parts_missing(tmp_path, part):
    collect = _load("gpu_collect")
    assert part in collect.collect(tmp_path)["missing"]
