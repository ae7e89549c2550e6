"""The gpu plan's attention: relative positions folded into q and k (no bias tensor)
computes SAM's attention, forward and gradients, in float32 on this CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedfms_jax.models import fused_attention as fa
from fedfms_jax.models import kernels as kn


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(B, qh, qw, H, W, nh, hd, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, qh * qw, nh, hd))
    k = jax.random.normal(ks[1], (B, H * W, nh, hd))
    v = jax.random.normal(ks[2], (B, H * W, nh, hd))
    # Tables of the size SAM's rel_pos tables have after get_rel_pos, large enough that
    # the bias moves the softmax.
    rh = 0.5 * jax.random.normal(ks[3], (qh, H, hd))
    rw = 0.5 * jax.random.normal(ks[4], (qw, W, hd))
    return q, k, v, rh, rw


# (qh, qw, H, W, hd): a global block (folded dim 16+12+12 = 40, no zero columns), a whole
# window (8+7+7 = 22 -> 24: zero columns), an edge window's real rows/columns (queries a
# corner of the key grid) and a non-square one.
SHAPES = {
    "global": (12, 12, 12, 12, 16),
    "window": (7, 7, 7, 7, 8),
    "edge_window": (3, 7, 7, 7, 8),
    "corner_non_square": (5, 2, 6, 4, 8),
}


@pytest.mark.parametrize("name", SHAPES)
def test_folded_attention_equals_reference_forward_and_gradients(name):
    qh, qw, H, W, hd = SHAPES[name]
    args = _inputs(2, qh, qw, H, W, 3, hd)
    scale = hd**-0.5
    ref = lambda *a: kn.PLANS["reference"].attend(*a, scale)  # noqa: E731
    folded = lambda *a: fa.fused_rel_pos_attention(*a, scale)  # noqa: E731
    out, want = jax.jit(folded)(*args), jax.jit(ref)(*args)
    assert out.shape == want.shape
    assert _rel_err(out, want) < 1e-5
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))  # noqa: E731
    grads = jax.jit(jax.grad(loss(folded), argnums=(0, 1, 2, 3, 4)))(*args)
    want_grads = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2, 3, 4)))(*args)
    for arg, g, r in zip("q k v rh rw".split(), grads, want_grads):
        assert _rel_err(g, r) < 1e-5, arg


def test_scale_applies_to_q_only():
    # The rel-pos term is added unscaled (SAM scales q before adding it): with a scale
    # other than 1 a wrongly scaled fold is far off.
    args = _inputs(1, 4, 4, 4, 4, 2, 8, seed=3)
    for scale in (0.1, 2.0):
        out = fa.fused_rel_pos_attention(*args, scale)
        assert _rel_err(out, kn.PLANS["reference"].attend(*args, scale)) < 1e-5


def test_no_bias_and_cudnn_head_dims_for_vit_b():
    calls = []
    real = jax.nn.dot_product_attention

    def record(q, k, v, bias=None, **kw):
        calls.append((q.shape, k.shape, v.shape, bias, kw.get("scale")))
        return real(q, k, v, bias=bias, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax.nn, "dot_product_attention", record)
        hd = 64
        for qh, qw, H, W in ((64, 64, 64, 64), (14, 14, 14, 14), (8, 14, 14, 14)):
            spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
            jax.eval_shape(lambda *a: fa.fused_rel_pos_attention(*a, hd**-0.5),
                           spec(1, qh * qw, 12, hd), spec(1, H * W, 12, hd), spec(1, H * W, 12, hd),
                           spec(qh, H, hd), spec(qw, W, hd))
    dims = [c[0][-1] for c in calls]
    assert dims == [192, 96, 96]  # ViT-B at 1024: global 64+64+64; windows 64+14+14 -> 96
    assert all(fa.cudnn_accepts(jnp.bfloat16, d) for d in dims)
    assert all(c[3] is None and c[4] == 1.0 for c in calls)
    assert all(c[0][-1] == c[1][-1] == c[2][-1] for c in calls)


def test_cudnn_acceptance_rule():
    assert fa.cudnn_accepts(jnp.bfloat16, 192)
    assert not fa.cudnn_accepts(jnp.float32, 192)
    assert not fa.cudnn_accepts(jnp.bfloat16, 92)
    assert not fa.cudnn_accepts(jnp.bfloat16, 264)
    assert fa.folded_head_dim(64, 14, 14) == 96 and fa.folded_head_dim(64, 64, 64) == 192


def test_cudnn_request_falls_back_to_xla_where_refused():
    # On this CPU cuDNN is refused while tracing; the call still computes the same thing.
    args = _inputs(1, 4, 4, 4, 4, 2, 8)
    want = kn.PLANS["reference"].attend(*args, 8**-0.5)
    for dtype in (jnp.float32, jnp.bfloat16):
        cast = [a.astype(dtype) for a in args]
        out = fa.fused_rel_pos_attention(*cast, 8**-0.5, implementation="cudnn")
        tol = 1e-5 if dtype == jnp.float32 else 3e-2
        assert _rel_err(out.astype(jnp.float32), want) < tol


def test_gpu_plan_asks_for_cudnn_on_a_cuda_backend(monkeypatch):
    assert kn.resolve_kernels("gpu").fused_impl is None  # this CPU: XLA's attention
    monkeypatch.setattr(kn, "_on_cuda", lambda: True)
    plan = kn.resolve_kernels("gpu")
    assert plan is kn.PLANS["gpu_cudnn"] and plan.name == "gpu" and plan.fused_impl == "cudnn"
    seen = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **k: seen.append(k.get("implementation")) or real(*a, **k))
    args = [a.astype(jnp.bfloat16) for a in _inputs(1, 4, 4, 4, 4, 2, 8)]
    out = plan.attend(*args, 8**-0.5)  # cuDNN refuses on this CPU: XLA's attention answers
    assert seen[0] == "cudnn" and seen[-1] is None
    want = kn.PLANS["reference"].attend(*[a.astype(jnp.float32) for a in args], 8**-0.5)
    assert _rel_err(out.astype(jnp.float32), want) < 3e-2
