"""Scanning the ViT encoder's repeating blocks computes what the unrolled loop does."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.models.image_encoder import VIT_CONFIGS, ImageEncoderViT, ViTConfig
from fedfms_jax.models.kernels import PLANS

# ViT-B's block pattern (windowed, windowed, global), twice, at a test width; at 96 px
# the 6x6 token grid pads to 8x8 windows of 4.
VIT_B_PATTERN = ViTConfig(32, 6, 2, (2, 5), window_size=4, out_chans=16)
IMG = 96


def _encoder(cfg, scan: bool, **kw) -> ImageEncoderViT:
    # Same seed, so both encoders hold the same weights; random adapters (not zero).
    return ImageEncoderViT(cfg, IMG, scan_blocks=scan, rngs=nnx.Rngs(0), **kw)


def _uses_scan(enc: ImageEncoderViT, x, depth_chunk=None) -> bool:
    graphdef, params = nnx.split(enc)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(x, depth_chunk))(params)
    return "scan" in str(jaxpr)


def _output_and_grads(enc: ImageEncoderViT, x, depth_chunk):
    graphdef, params = nnx.split(enc)
    cot = jax.random.normal(jax.random.key(2), (len(x), IMG // 16, IMG // 16, enc.cfg.out_chans))

    def loss(p):
        out = nnx.merge(graphdef, p)(x, depth_chunk)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, nnx.to_flat_state(grads)


@pytest.mark.parametrize("adapters, remat, depth_chunk", [(False, False, None), (True, True, None),
                                                          (True, False, 2)])
def test_scan_matches_unrolled(adapters, remat, depth_chunk):
    # The CPU plan with its cotangent barrier after every block, as ViT-B gets it.
    kernels = dataclasses.replace(PLANS["cpu"], barrier_min_depth=1)
    kw = dict(adapters=adapters, remat=remat, pad_before_norm1=adapters, kernels=kernels)
    x = jax.random.normal(jax.random.key(1), (2, IMG, IMG, 3))
    scanned, unrolled = _encoder(VIT_B_PATTERN, True, **kw), _encoder(VIT_B_PATTERN, False, **kw)
    assert _uses_scan(scanned, x, depth_chunk) and not _uses_scan(unrolled, x, depth_chunk)

    out_s, grads_s = _output_and_grads(scanned, x, depth_chunk)
    out_u, grads_u = _output_and_grads(unrolled, x, depth_chunk)
    np.testing.assert_allclose(out_s, out_u, rtol=1e-6, atol=1e-6)
    # Same parameter names, and every block's own parameters get their own gradient.
    assert [p for p, _ in grads_s] == [p for p, _ in grads_u]
    assert ("blocks", 5, "attn", "rel_pos_h") in dict(grads_s)
    for (path, gs), (_, gu) in zip(grads_s, grads_u):
        np.testing.assert_allclose(gs[...], gu[...], rtol=1e-5, atol=1e-5, err_msg=str(path))
    g = dict(grads_s)
    assert not np.allclose(g[("blocks", 0, "mlp", "lin1", "kernel")][...],
                           g[("blocks", 3, "mlp", "lin1", "kernel")][...])


@pytest.mark.parametrize("cfg, period", [
    (VIT_B_PATTERN, 3),
    (dataclasses.replace(VIT_CONFIGS["vit_h"], embed_dim=32, num_heads=2), 8),
    (VIT_CONFIGS["vit_tiny"], 2),
    (ViTConfig(32, 3, 2, (1,), window_size=4, out_chans=16), None),  # no repeat: unrolled
])
def test_block_period(cfg, period):
    enc = nnx.eval_shape(lambda: _encoder(cfg, True))
    assert enc._block_period() == period
    if period is None:
        assert not _uses_scan(_encoder(cfg, True), jnp.zeros((1, IMG, IMG, 3)))
