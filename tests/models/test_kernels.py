"""Kernel plans: which program each backend gets, and that every plan computes the same
function (float32, on this CPU: the gpu plan runs through XLA's attention lowering)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.models import kernels as kn
from fedfms_jax.models import rel_pos_attention as rpa
from fedfms_jax.models.image_encoder import VIT_CONFIGS, ImageEncoderViT, ViTConfig
from fedfms_jax.models.sam import SamConfig, build_sam

PLAN_NAMES = ("reference", "cpu", "gpu")
# Deep enough for the cpu plan's barrier (8 blocks), small enough to compile quickly;
# 40 px -> a 5x5 grid padded to windows of 2, one global block.
DEEP_TINY = ViTConfig(16, 8, 2, (1,), patch_size=8, window_size=2, out_chans=8)


def _host_calls(module_text: str) -> list[str]:
    """Custom-call targets of a lowered module that call back into the host (Python)."""
    targets = re.findall(r'custom_call @([\w.]+)|custom_call_target\s*=\s*"([^"]+)"', module_text)
    return [t for pair in targets for t in pair if "callback" in t.lower()]


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _modules_with_plans(model):
    return [m for _, m in nnx.iter_modules(model) if hasattr(m, "kernels")]


def test_gpu_plan_choices_reach_every_module():
    model = nnx.eval_shape(lambda: build_sam(SamConfig(encoder="vit_tiny", image_size=64, adapters=True,
                                                       prompt_free=True, kernels="gpu"), rngs=nnx.Rngs(0)))
    plan = model.kernels
    assert plan.name == "gpu"
    assert plan.attention == "dot_product_attention"
    assert not plan.mixed_matmul
    assert not plan.barrier_between_blocks(VIT_CONFIGS["vit_h"].depth)
    holders = _modules_with_plans(model)
    # Sam, encoder, patch embed, neck convs, every attention, the decoder's upscaling.
    assert len(holders) > 8
    assert all(m.kernels is plan for m in holders)
    linears = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
    assert linears and all(lin.dot_general is jax.lax.dot_general for lin in linears)  # no mixed product


def test_cpu_and_reference_plans():
    cpu, ref = kn.PLANS["cpu"], kn.PLANS["reference"]
    assert (cpu.attention, cpu.mixed_matmul) == ("cpu", True)
    assert cpu.barrier_between_blocks(12) and not cpu.barrier_between_blocks(4)
    assert (ref.attention, ref.mixed_matmul, ref.barrier_min_depth) == ("reference", False, None)


def test_auto_resolves_from_the_backend_at_build_time(monkeypatch):
    expected = "cpu" if jax.default_backend() == "cpu" else "gpu"
    assert kn.resolve_kernels("auto") is kn.PLANS[expected]
    assert kn.resolve_kernels(kn.PLANS["gpu"]) is kn.PLANS["gpu"]
    enc = ImageEncoderViT(DEEP_TINY, 40, rngs=nnx.Rngs(0))
    assert enc.kernels is kn.PLANS[expected]

    def asked(*_):
        raise AssertionError("the backend was asked while tracing")

    # Tracing the forward and backward passes never asks the backend again.
    monkeypatch.setattr(jax, "default_backend", asked)
    graph, params = nnx.split(enc)
    jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(nnx.merge(graph, p)(x))))(params, jnp.ones((1, 40, 40, 3)))


def test_unknown_plans_are_refused():
    with pytest.raises(ValueError, match="kernels='tpu' is not one of"):
        SamConfig(kernels="tpu")
    with pytest.raises(ValueError, match="is not one of"):
        kn.resolve_kernels("cuda")


def _encoder_step(kernels: str):
    enc = ImageEncoderViT(DEEP_TINY, 40, kernels=kernels, rngs=nnx.Rngs(0))
    graph, params = nnx.split(enc)
    step = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(nnx.merge(graph, p)(x)))))
    return step, params, jnp.ones((2, 40, 40, 3))


def test_gpu_program_has_no_host_callback(monkeypatch):
    calls = []
    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))

    def einsum_layout(*_, **__):
        raise AssertionError("the gpu plan took an einsum attention layout")

    monkeypatch.setattr(rpa, "rel_pos_attention", einsum_layout)
    step, params, x = _encoder_step("gpu")
    jaxpr = str(jax.make_jaxpr(step)(params, x))
    # Every attention is the fused call: the global block's, and each windowed block's
    # four bands of windows (whole windows and the 5x5 grid's edge windows, per axis).
    assert len(calls) == 1 + 4 * (DEEP_TINY.depth - 1)
    monkeypatch.undo()
    assert "pure_callback" not in jaxpr
    assert not _host_calls(step.lower(params, x).as_text())
    # The same forward+grad lowers for CUDA from this machine, still without host calls.
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x))
    exported = jax.export.export(step, platforms=("cuda",))(*shapes)
    assert not _host_calls(exported.mlir_module())

    # The check can fail: the cpu plan's program of the same encoder has one per block.
    step, params, x = _encoder_step("cpu")
    assert str(jax.make_jaxpr(step)(params, x)).count("pure_callback") == DEEP_TINY.depth
    assert len(_host_calls(step.lower(params, x).as_text())) == DEEP_TINY.depth


def test_plans_agree_on_encoder_output_and_gradients():
    # vit_tiny at 160: a 10x10 grid padded to 12x12 windows of 4 (edge bands, corner
    # queries) and two global blocks.
    x = jax.random.normal(jax.random.key(1), (2, 160, 160, 3))
    results = {}
    for name in PLAN_NAMES:
        enc = ImageEncoderViT(VIT_CONFIGS["vit_tiny"], 160, kernels=name, rngs=nnx.Rngs(0))
        graph, params = nnx.split(enc)
        loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graph, p)(x)))  # noqa: E731
        out = jax.jit(lambda p, x: nnx.merge(graph, p)(x))(params, x)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        results[name] = (out, jax.tree.leaves(grads))
    ref_out, ref_grads = results["reference"]
    for name in ("cpu", "gpu"):
        out, grads = results[name]
        assert _rel_err(out, ref_out) < 1e-5, name
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
        assert len(grads) == len(ref_grads)
        for g, r in zip(grads, ref_grads):
            assert _rel_err(g, r) < 1e-5, name


def test_plans_agree_on_blockwise_sized_attention():
    # 48x48 keys x 2 heads: above the cpu plan's 32 MB budget, so it takes the blockwise
    # layout; reference and gpu compute all scores at once.
    B, H, W, nh, hd = 1, 48, 48, 2, 8
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (B, H * W, nh, hd)) for key in ks[:3])
    rh = 0.3 * jax.random.normal(ks[3], (H, H, hd))
    rw = 0.3 * jax.random.normal(ks[4], (W, W, hd))
    assert rpa.cpu_layout((B, nh, H * W, hd), H * W) == "blockwise"
    args, scale = (q, k, v, rh, rw), hd**-0.5

    def run(name):
        loss = lambda *a: jnp.sum(jnp.sin(kn.PLANS[name].attend(*a, scale)))  # noqa: E731
        return kn.PLANS[name].attend(*args, scale), jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)

    ref_out, ref_grads = run("reference")
    for name in ("cpu", "gpu"):
        out, grads = run(name)
        assert _rel_err(out, ref_out) < 1e-6, name
        for arg, g, r in zip("q k v rh rw".split(), grads, ref_grads):
            assert _rel_err(g, r) < 1e-5, (name, arg)
