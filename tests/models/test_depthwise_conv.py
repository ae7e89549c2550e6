"""depthwise_conv2d computes what a grouped nnx.Conv computes, in values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.models.common import depthwise_conv2d


@pytest.mark.parametrize("kernel,stride,pad", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (3, 2, 0)])
def test_matches_grouped_flax_conv(kernel, stride, pad):
    c = 6
    ref = nnx.Conv(c, c, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=c, use_bias=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 11, 14, c))

    def ours(k, x):
        return depthwise_conv2d(x, k, stride, pad, jnp.float32)

    def theirs(k, x):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)

    k = ref.kernel[...]
    np.testing.assert_allclose(ours(k, x), ref(x), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda k, x: jnp.sum(jnp.sin(f(k, x)))  # noqa: E731
    g, g_ref = jax.grad(loss(ours), (0, 1))(k, x), jax.grad(loss(theirs), (0, 1))(k, x)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_products_with_float32_sums():
    """In bf16 the inputs round to bf16 and the sums stay float32, as the grouped conv's
    preferred_element_type=float32 does."""
    x = jax.random.normal(jax.random.key(2), (1, 8, 8, 4))
    k = jax.random.normal(jax.random.key(3), (3, 3, 1, 4))
    got = depthwise_conv2d(x, k, 1, 1, jnp.bfloat16)
    want = jax.lax.conv_general_dilated(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4,
                                        preferred_element_type=jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
