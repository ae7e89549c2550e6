"""mixed_einsum / linear_options: bf16 operands, float32 sums and results, and a backward
pass that matches the float32 gradient to bf16 accuracy and returns it in float32."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.models.mixed_matmul import linear_options, mixed_einsum, use_mixed

BF = jnp.bfloat16


def rounded(t):
    return t.astype(BF).astype(jnp.float32)


def _operands(spec_shapes, seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return jax.random.normal(ka, spec_shapes[0]), jax.random.normal(kb, spec_shapes[1])


@pytest.mark.parametrize("spec,shapes", [
    ("mk,kn->mn", ((16, 24), (24, 8))),
    ("bhnd,bhmd->bhnm", ((2, 3, 10, 8), (2, 3, 12, 8))),
    ("bhnm,bhmd->bhnd", ((2, 3, 10, 12), (2, 3, 12, 8))),
    ("nhpwqc,pqco->nhwo", ((2, 3, 4, 5, 4, 3), (4, 4, 3, 6))),
])
def test_values_and_gradients(spec, shapes):
    assert use_mixed(BF)
    a, b = _operands(shapes)
    got = mixed_einsum(spec, a, b, BF)
    assert got.dtype == jnp.float32
    # Products of bf16 values are exact in float32: only the summation order differs.
    np.testing.assert_allclose(got, jnp.einsum(spec, rounded(a), rounded(b)), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda a, b: jnp.sum(jnp.sin(fn(a, b)))

    ga, gb = jax.grad(loss(lambda a, b: mixed_einsum(spec, a, b, BF)), argnums=(0, 1))(a, b)
    ra, rb = jax.grad(loss(lambda a, b: jnp.einsum(spec, a, b)), argnums=(0, 1))(a, b)
    assert ga.dtype == a.dtype and gb.dtype == b.dtype
    # float32 operands get float32 gradients, not bf16 ones widened back.
    assert not np.array_equal(rounded(gb), gb) and not np.array_equal(rounded(ga), ga)
    for g, r in ((ga, ra), (gb, rb)):
        assert float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) < 2e-2


def test_float32_is_the_plain_einsum():
    a, b = _operands(((5, 7), (7, 3)))
    assert not use_mixed(jnp.float32)
    np.testing.assert_array_equal(mixed_einsum("mk,kn->mn", a, b, jnp.float32), jnp.einsum("mk,kn->mn", a, b))


def test_refuses_specs_it_cannot_differentiate():
    a, b = _operands(((5, 7), (7, 3)))
    with pytest.raises(ValueError, match="lone summed"):
        mixed_einsum("mk,kn->n", a, b, BF)


def test_linear_options():
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    plain = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    mixed32 = nnx.Linear(16, 8, rngs=nnx.Rngs(0), **linear_options(jnp.float32))
    mixed16 = nnx.Linear(16, 8, rngs=nnx.Rngs(0), **linear_options(BF))
    np.testing.assert_array_equal(mixed32(x), plain(x))  # float32: untouched
    y = mixed16(x)
    assert y.shape == (2, 5, 8) and y.dtype == jnp.float32
    assert float(jnp.linalg.norm(y - plain(x)) / jnp.linalg.norm(plain(x))) < 1e-2

    def kernel_grad(layer):
        return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(layer).kernel[...]

    got, want = kernel_grad(mixed16), kernel_grad(plain)
    assert got.dtype == jnp.float32 and mixed16.kernel[...].dtype == jnp.float32
    assert not np.array_equal(rounded(got), got)  # not rounded to bf16
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 2e-2


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, ...]]:
    """Element types of every dot's operands in compiled HLO text (fusions included)."""
    dtypes, dots = {}, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (\w+)\[", line)
        if m:
            dtypes[m.group(1)] = m.group(2)
        m = re.search(r" dot\((%[\w.\-]+), (%[\w.\-]+)\)", line)
        if m:
            dots.append(m.groups())
        for name, dtype in re.findall(r"(%?[\w.\-]+): (\w+)\[", line):  # computation params
            dtypes["%" + name.lstrip("%")] = dtype
    return [tuple(dtypes[o] for o in operands) for operands in dots]


def test_linear_gradients_keep_bf16_operands():
    # XLA:CPU runs a bf16 product whose left operand contracts its leading axis in float32
    # (upcast operands); the weight gradient must reach the product with bf16 operands.
    layer = nnx.Linear(64, 96, param_dtype=jnp.float32, rngs=nnx.Rngs(0), **linear_options(BF))
    x = jax.random.normal(jax.random.key(1), (32, 64))

    graph, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(jnp.sin(nnx.merge(graph, params)(x)))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    operand_dtypes = _dot_operand_dtypes(hlo)
    assert len(operand_dtypes) == 3  # forward, input gradient, weight gradient
    assert all(dts == ("bf16", "bf16") for dts in operand_dtypes), operand_dtypes
