"""The cotangent barrier is an exact identity for values and gradients, under vmap too."""
import jax
import jax.numpy as jnp
import numpy as np

from fedfms_jax.models.fusion_barrier import cotangent_barrier


def _loss(x, barrier):
    y = jnp.tanh(x) * 3.0
    y = cotangent_barrier(y) if barrier else y
    return jnp.sum(jnp.sin(y) * x)


def test_identity_and_gradient_unchanged():
    x = jax.random.normal(jax.random.key(0), (2, 5, 7))
    np.testing.assert_array_equal(cotangent_barrier(x), x)
    g_ref = jax.jit(jax.grad(lambda x: _loss(x, False)))(x)
    g = jax.jit(jax.grad(lambda x: _loss(x, True)))(x)
    np.testing.assert_array_equal(g, g_ref)


def test_gradient_unchanged_under_vmap():
    xs = jax.random.normal(jax.random.key(1), (3, 4, 6))
    per_client = lambda barrier: jax.jit(jax.vmap(jax.grad(lambda x: _loss(x, barrier))))  # noqa: E731
    np.testing.assert_array_equal(per_client(True)(xs), per_client(False)(xs))


def test_cpu_backward_passes_through_an_opaque_call():
    # The barrier only works if XLA cannot see through it: the backward pass must
    # contain the host call (a plain identity would be fused away).
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: _loss(x, True)))(jnp.ones((3,)))
    assert "pure_callback" in str(jaxpr)


def _encoder_grad_jaxpr(depth: int, kernels: str = "cpu") -> str:
    from flax import nnx

    from fedfms_jax.models.image_encoder import ImageEncoderViT, ViTConfig
    cfg = ViTConfig(16, depth, 1, (), patch_size=8, window_size=2, out_chans=8)
    enc = ImageEncoderViT(cfg, 32, kernels=kernels, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(enc)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x))  # noqa: E731
    return str(jax.make_jaxpr(jax.grad(loss))(params, jnp.ones((1, 32, 32, 3))))


def test_barrier_only_in_deep_encoders():
    # With the cpu plan, deep encoders (ViT-B and up) get the barrier between blocks;
    # shallow ones do not, so their programs stay free of host calls and fit JAX's
    # persistent cache.
    from fedfms_jax.models.kernels import PLANS
    depth = PLANS["cpu"].barrier_min_depth
    assert depth == 8
    assert _encoder_grad_jaxpr(depth).count("pure_callback") == depth
    assert "pure_callback" not in _encoder_grad_jaxpr(depth - 1)


def test_no_barrier_in_the_gpu_and_reference_plans():
    # A host call would cost an accelerator a device round trip per block.
    for kernels in ("gpu", "reference"):
        assert "pure_callback" not in _encoder_grad_jaxpr(8, kernels)
