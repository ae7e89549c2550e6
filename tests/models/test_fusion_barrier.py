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
    # The barrier only works if XLA cannot see through it: on CPU the backward pass
    # must contain the host call (a plain identity would be fused away).
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: _loss(x, True)))(jnp.ones((3,)))
    assert "pure_callback" in str(jaxpr)
