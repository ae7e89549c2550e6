"""Functional tests of the benchmark harness (no timing assertions)."""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedfms_jax.benchmark import load_config, main
from fedfms_jax.benchmarking import flops as flops_lib
from fedfms_jax.benchmarking.report import SUMMARY_KEYS

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "benchmark.py")


def test_config_overrides_are_typed_and_checked():
    c = load_config(f"{CONFIG}:method=fedsam,clients=3,remat=true,repeats=2")
    assert (c.method, c.clients, c.remat, c.repeats) == ("fedsam", 3, True, 2)
    assert load_config(CONFIG).to_dict()["image_size"] == 256
    with pytest.raises(KeyError):
        load_config(f"{CONFIG}:nope=1")
    with pytest.raises(ValueError):
        load_config(f"{CONFIG}:method=fedprox")
    with pytest.raises(ValueError):
        load_config(f"{CONFIG}:clients=two")


def test_jaxpr_flops_counts_scans_and_convs_exactly():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 16))

    def chain(a, b):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ b), None), a, None, length=5)[0]

    assert flops_lib.jaxpr_flops(chain, a, b) == 5 * 2 * 8 * 16 * 16
    x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops_lib.jaxpr_flops(conv, x, w) == 2 * (2 * 6 * 6 * 4) * (3 * 3 * 3)
    # XLA's own count agrees on loop-free code (up to elementwise work).
    xla = flops_lib.xla_flops(lambda a, b: a @ b, a, b)
    assert xla is None or xla == pytest.approx(2 * 8 * 16 * 16, rel=0.05)


def test_peak_table_matches_known_gpus():
    class Dev:
        platform = "gpu"
        device_kind = "NVIDIA H200"

    assert flops_lib.table_peak_flops(Dev, "bfloat16") == pytest.approx(989.4e12)
    Dev.device_kind = "NVIDIA H100 PCIe"
    assert flops_lib.table_peak_flops(Dev, "float32") == pytest.approx(51.2e12)
    Dev.device_kind = "Unknown accelerator"
    assert flops_lib.table_peak_flops(Dev, "bfloat16") is None


def _tiny_torch_sam():
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder = nn.ModuleDict(
                {"proj": nn.Conv2d(3, 4, 4, stride=4), "Space_Adapter": nn.Conv2d(4, 4, 1)})
            self.mask_decoder = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            h = self.image_encoder["proj"](x)
            h = h + self.image_encoder["Space_Adapter"](torch.relu(h))
            return self.mask_decoder(h)

    torch.manual_seed(0)
    return Tiny()


@pytest.mark.parametrize("method", ["fedmsa", "fedsam"])
@pytest.mark.parametrize("persistent", [True, False])
def test_original_round_is_weighted_parameter_average(persistent, method):
    import torch

    from fedfms_jax.reference.torch_original_round import OriginalStyleFederation

    model = _tiny_torch_sam()
    init = copy.deepcopy(model)
    weights = [0.25, 0.75, 0.0]  # the third client is the unseen site: never trained
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 2, 3, 16, 16, generator=gen)  # [steps, clients, B, 3, H, W]
    labels = (torch.rand(2, 3, 2, 1, 4, 4, generator=gen) < 0.3).float()
    fed = OriginalStyleFederation(model, method=method, weights=weights, persistent=persistent)
    fed.run_round(images, labels)

    # Independent computation: each trained client from the initial model, Adam, BCE(pos_weight=2).
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))
    trained = []
    for c in range(2):
        m = copy.deepcopy(init)
        for name, p in m.named_parameters():
            p.requires_grad_(method == "fedsam" or not name.startswith("image_encoder.") or "Adapter" in name)
        opt = torch.optim.Adam(m.parameters(), lr=1e-4)
        for s in range(2):
            opt.zero_grad()
            loss_fn(m(images[s, c]), labels[s, c]).backward()
            opt.step()
        trained.append(dict(m.named_parameters()))
    result = fed.models[2] if persistent else fed.global_model
    for name, p in result.named_parameters():
        expected = 0.25 * trained[0][name] + 0.75 * trained[1][name]
        torch.testing.assert_close(p.data, expected.data, rtol=1e-6, atol=1e-7)
        # FedMSA freezes the encoder outside its adapters; FedSAM trains everything.
        moved = float((p - dict(init.named_parameters())[name]).abs().max()) > 1e-6
        assert moved == (method == "fedsam" or not name.startswith("image_encoder.proj")), name
    if persistent:  # every site holds the same averaged model afterwards
        for m in fed.models[:2]:
            for a, b in zip(m.parameters(), result.parameters()):
                assert torch.equal(a, b)


def _check_summary(result: dict, with_torch: bool):
    for key in SUMMARY_KEYS:
        assert key in result
        value = result[key]
        if key in ("torch_images_per_s", "speedup") and not with_torch:
            assert value is None
            continue
        assert value is not None and math.isfinite(value) and value > 0, (key, value)


TINY = "variant=vit_tiny,image_size=64,clients=2,batch=1,steps=2,warmup=0,repeats=2,flops=jaxpr"


@pytest.mark.slow
def test_benchmark_cli_round(tmp_path):
    # FedMSA, so that both frameworks must agree on which parameters the adapters add.
    out = tmp_path / "bench.json"
    result = main(["--config", f"{CONFIG}:{TINY},torch_repeats=1", "--json", str(out)])
    _check_summary(result, with_torch=True)
    saved = json.loads(out.read_text())
    for key in SUMMARY_KEYS:
        assert saved[key] == pytest.approx(result[key])
    assert saved["speedup"] == pytest.approx(saved["jax_images_per_s"] / saved["torch_images_per_s"])
    assert result["torch"]["trainable_params"] == result["jax"]["trainable_params"]
    # Each side ran in a fresh process of its own, and the JAX one never imported torch.
    pids = {result["jax"]["process"]["pid"], result["torch"]["process"]["pid"], os.getpid()}
    assert len(pids) == 3 and result["processes"] == "separate"
    assert result["jax"]["process"]["torch_imported"] is False
    assert result["torch"]["process"]["torch_imported"] is True
    assert 0 < saved["torch_mfu"] == pytest.approx(
        saved["flops_per_image"] * saved["torch_images_per_s"] / saved["jax"]["peak_flops"])
    assert saved["torch"]["matmul_peak_flops"] > 0
    assert saved["torch"]["mfu_own_peak"] == pytest.approx(  # ... and against torch's own matmul rate
        saved["flops_per_image"] * saved["torch_images_per_s"] / saved["torch"]["matmul_peak_flops"])
    assert len(saved["jax"]["round"]["samples_s"]) == 2
    assert len(saved["torch"]["round"]["samples_s"]) == 1
    assert saved["jax"]["eval_images_per_s"] > 0
    # A FedMSA client sends its trainable leaves only: fewer bytes than the whole model.
    assert 0 < result["comm_bytes_per_round"] < 4 * result["jax"]["total_params"]
    assert result["jax"]["comm_bytes_nonzero_grad"] <= result["comm_bytes_per_round"]


@pytest.mark.slow
def test_benchmark_cli_encoder_mode():
    result = main(["--config", f"{CONFIG}:mode=encoder,variant=vit_tiny,image_size=64,repeats=2",
                   "--no-torch"])
    assert result["jax_images_per_s"] > 0 and result["flops_per_image"] > 0
    assert result["torch_images_per_s"] is None and result["speedup"] is None
    assert result["compile_s"] > 0


def test_ops_are_grouped_by_kind():
    from fedfms_jax.benchmarking import ops

    assert ops.op_group("multiply_add_fusion.12") == ("multiply_add_fusion", ops.ELEMENTWISE)
    assert ops.op_group("add_convert_fusion.3.clone.1") == ("add_convert_fusion", ops.ELEMENTWISE)
    assert ops.op_group("wrapped_convert.7") == ("wrapped_convert", ops.ELEMENTWISE)
    assert ops.op_group("dot.4")[0] == ops.MATMUL
    assert ops.op_group("convolution.2")[0] == ops.MATMUL
    assert ops.op_group("convert_fusion.1")[0] != ops.MATMUL  # 'conv' only as a word of its own
    assert ops.op_group("transpose_copy_fusion.5")[0] == ops.COPY
    assert ops.op_group("copy.9")[0] == ops.COPY
    assert ops.op_group("dynamic_update_slice_fusion.2")[0] == ops.DYNAMIC_SLICE
    assert ops.op_group("dynamic-slice.8")[0] == ops.DYNAMIC_SLICE
    assert ops.op_group("reduce-window.1")[0] == ops.REDUCTION
    assert ops.op_group("while.3")[0] == ops.CONTROL_FLOW
    assert ops.op_group("all-reduce.14")[0] == ops.COLLECTIVE  # not a reduction on this device
    assert ops.op_group("custom-call.1")[0] == ops.OTHER


def test_products_and_reductions_are_found_in_the_compiled_hlo():
    from fedfms_jax.benchmarking import ops

    a = jnp.ones((64, 64))
    hlo = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1).lower(a, a).compile().as_text()
    # Whatever XLA:CPU names the product (a dot, a YNNPACK or oneDNN fusion), it is found,
    # and the elementwise tail is not taken for one.
    assert list(ops.hlo_categories(hlo).values()) == [ops.MATMUL], ops.hlo_categories(hlo)
    assert ops.hlo_module_name(hlo).startswith("jit_")
    elementwise = jax.jit(lambda a: jnp.tanh(a) + 1).lower(a).compile().as_text()
    assert ops.hlo_categories(elementwise) == {}
    reduction = jax.jit(lambda a: jnp.max(jnp.abs(a), axis=0)).lower(a).compile().as_text()
    assert list(ops.hlo_categories(reduction).values()) == [ops.REDUCTION]
    # A branch's event spans the ops it runs, whatever JAX named it ('cond.N').
    branch = jax.jit(lambda a: jax.lax.cond(a[0, 0] > 0, jnp.sin, jnp.cos, a)).lower(a).compile().as_text()
    assert ops.CONTROL_FLOW in ops.hlo_categories(branch).values()


def test_ops_summary_sums_groups_and_leaves_loops_out():
    from fedfms_jax.benchmarking import ops

    # Two rounds; the while loop's own event spans the ops it ran and must not count.
    events = [("jit_r", name, s) for name, s in [
        ("ynn_fusion", 0.3), ("ynn_fusion", 0.3), ("dot.1", 0.3), ("dot.1", 0.3), ("fusion_x.2", 0.1),
        ("multiply_add_fusion.3", 0.2), ("multiply_add_fusion.4", 0.2), ("copy.5", 0.3), ("while.6", 2.0)]]
    s = ops.summarize_ops(events, rounds=2, wall_s_per_round=1.5, matmul_flops_per_round=3e9,
                          peak_flops=10e9, top=2, hlo_category={"jit_r": {"ynn_fusion": ops.MATMUL}})
    groups = {g["group"]: g for g in s["groups"]}
    assert sum(g["s_per_round"] for g in s["groups"]) == pytest.approx(s["op_s_per_round"])
    assert s["op_s_per_round"] == pytest.approx(1.0)
    assert groups[ops.MATMUL]["ops_per_round"] == 2  # the YNNPACK fusion, named as in the HLO, and the dot
    assert [stem for stem, _ in groups[ops.MATMUL]["stems_s_per_round"]] == ["ynn_fusion", "dot"]
    assert s["control_flow_s_per_round"] == pytest.approx(1.0)
    assert groups["multiply_add_fusion"]["s_per_round"] == pytest.approx(0.2)
    assert groups["multiply_add_fusion"]["ops_per_round"] == 1
    assert groups[ops.MATMUL]["achieved_flops"] == pytest.approx(3e9 / 0.6)
    assert groups[ops.MATMUL]["fraction_of_peak"] == pytest.approx(0.5)
    assert [g["group"] for g in s["groups"]][0] == ops.MATMUL  # slowest first
    assert [o["op"] for o in s["top_ops"]] == ["ynn_fusion", "dot.1"]
    assert s["op_time_over_wall"] == pytest.approx(1.0 / 1.5)


@pytest.mark.slow
def test_benchmark_cli_ops_mode(tmp_path):
    from fedfms_jax.benchmarking import ops

    out = tmp_path / "ops.json"
    tiny = "variant=vit_tiny,image_size=64,clients=2,batch=1,steps=1,repeats=1,warmup=0,flops=jaxpr,torch=false"
    result = main(["--config", f"{CONFIG}:mode=ops,{tiny},top=4", "--json", str(out)])
    saved = json.loads(out.read_text())
    for key in ("groups", "top_ops", "op_s_per_round", "wall_s_per_round", "op_time_over_wall", "op_events",
                "peak_flops", "mfu", "round", "config", "load_average_1_5_15"):
        assert key in saved, key
    groups = saved["groups"]
    # Rounded to the JSON's precision only: the groups partition the traced op time.
    assert sum(g["s_per_round"] for g in groups) == pytest.approx(saved["op_s_per_round"], rel=1e-9)
    assert sum(g["share"] for g in groups) == pytest.approx(1.0, rel=1e-9)
    (matmul,) = [g for g in groups if g["group"] == ops.MATMUL]
    assert matmul["ops_per_round"] > 0 and matmul["s_per_round"] > 0
    assert matmul["achieved_flops"] == pytest.approx(matmul["flops_per_round"] / matmul["s_per_round"])
    assert 0 < matmul["fraction_of_peak"] and 0 < saved["mfu"]
    assert any(g["category"] == ops.ELEMENTWISE for g in groups)
    assert 0 < len(saved["top_ops"]) <= 4
    # Traced in a process of its own, which had XLA:CPU's per-op events switched on.
    assert ops.XPROF_FLAG in saved["xla_flags"].split()
    assert saved["process"]["pid"] != os.getpid()
    assert result["op_events"] == saved["op_events"] > 0
    # The markdown table for BENCHMARKS.md reads the same JSON.
    from fedfms_jax.benchmarking.table import ops_table

    assert f"| {ops.MATMUL} | {matmul['s_per_round']:.2f} |" in ops_table(saved)
