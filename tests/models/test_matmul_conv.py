"""MatmulConv2d computes what nnx.Conv computes, in values and in gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.models.common import MatmulConv2d


def _grads(module, x):
    gd, st = nnx.split(module)
    return jax.grad(lambda st, x: jnp.sum(jnp.sin(nnx.merge(gd, st)(x))), argnums=(0, 1))(st, x)


@pytest.mark.parametrize("kernel,stride,use_bias", [(4, 4, True), (1, 1, False), (3, 3, False), (3, 1, False)])
def test_matches_flax_conv(kernel, stride, use_bias):
    padding = "VALID" if stride == kernel else "SAME"
    ref = nnx.Conv(5, 7, (kernel, kernel), strides=(stride, stride), padding=padding, use_bias=use_bias,
                   rngs=nnx.Rngs(0))
    conv = MatmulConv2d(5, 7, kernel, stride=stride, use_bias=use_bias, rngs=nnx.Rngs(1))
    assert conv.kernel.shape == ref.kernel.shape
    conv.kernel[...] = ref.kernel[...]
    if use_bias:
        ref.bias[...] = jax.random.normal(jax.random.key(3), ref.bias.shape)
        conv.bias[...] = ref.bias[...]
    x = jax.random.normal(jax.random.key(1), (2, 12, 24, 5))
    np.testing.assert_allclose(conv(x), ref(x), rtol=1e-5, atol=1e-5)

    (g, gx), (g_ref, gx_ref) = _grads(conv, x), _grads(ref, x)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g["kernel"][...], g_ref["kernel"][...], rtol=1e-4, atol=1e-4)
    if use_bias:
        np.testing.assert_allclose(g["bias"][...], g_ref["bias"][...], rtol=1e-4, atol=1e-4)


def test_refuses_unsupported_geometry():
    with pytest.raises(ValueError, match="stride"):
        MatmulConv2d(3, 4, 3, stride=2, rngs=nnx.Rngs(0))
