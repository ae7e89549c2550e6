"""UpConv2x2 computes exactly what a stride-2 2x2 transposed convolution computes."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.models.common import UpConv2x2


def test_matches_flax_conv_transpose_values_and_gradients():
    ref = nnx.ConvTranspose(8, 4, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True,
                            rngs=nnx.Rngs(0))
    ref.bias[...] = jax.random.normal(jax.random.key(3), ref.bias.shape)
    up = UpConv2x2(8, 4, rngs=nnx.Rngs(1))
    assert up.kernel.shape == ref.kernel.shape and up.bias.shape == ref.bias.shape
    up.kernel[...], up.bias[...] = ref.kernel[...], ref.bias[...]
    x = jax.random.normal(jax.random.key(1), (2, 5, 6, 8))
    np.testing.assert_allclose(up(x), ref(x), rtol=1e-6, atol=1e-6)

    def grads(module):
        gd, st = nnx.split(module)
        return jax.grad(lambda st, x: jnp.sum(jnp.sin(nnx.merge(gd, st)(x))), argnums=(0, 1))(st, x)

    (g_up, gx_up), (g_ref, gx_ref) = grads(up), grads(ref)
    np.testing.assert_allclose(gx_up, gx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_up["kernel"][...], g_ref["kernel"][...], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_up["bias"][...], g_ref["bias"][...], rtol=1e-5, atol=1e-5)
