"""The blockwise (CPU) attention layout computes the same function as the full one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedfms_jax.models import rel_pos_attention as rpa


def _inputs(B, nh, H, W, hd, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(key, (B, nh, H * W, hd), dtype) for key in ks[:3])
    rh = 0.3 * jax.random.normal(ks[3], (H, H, hd), dtype)
    rw = 0.3 * jax.random.normal(ks[4], (W, W, hd), dtype)
    return q, k, v, rh, rw


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_cpu_layout_is_blockwise_above_32mb_of_scores():
    # Every ViT-B block at 1024 goes blockwise (global: a 64x64 grid; windowed: 25
    # windows of 14x14 per image, 12 heads); at 256 (four windows, a 16x16 grid) both
    # stay in the full layout.
    assert rpa.cpu_layout((1, 12, 64 * 64, 64), 64 * 64) == "blockwise"
    assert rpa.cpu_layout((25, 12, 14 * 14, 64), 14 * 14) == "blockwise"
    assert rpa.cpu_layout((4, 12, 14 * 14, 64), 14 * 14) == "full"
    assert rpa.cpu_layout((1, 12, 16 * 16, 64), 16 * 16) == "full"


def test_row_blocks_respect_the_score_budget():
    # A 64x64 grid (ViT-B global attention at 1024) is split into 8 blocks of 8 rows.
    assert rpa._rows_per_block(64, 64, 64 * 64) == 8
    assert rpa._rows_per_block(14, 14, 14 * 14) == 14  # a whole window in one block
    assert rpa._rows_per_block(48, 48, 48 * 48) == 16  # largest divisor of 48 within budget


@pytest.mark.parametrize("hw", [(48, 48), (14, 14), (6, 10)])
def test_blockwise_equals_full_values_and_gradients(hw):
    H, W = hw
    args = _inputs(2, 2, H, W, 8)
    scale = 8**-0.5
    run = lambda impl: lambda *a: rpa.rel_pos_attention(*a, scale, impl)  # noqa: E731
    full, block = run("full")(*args), run("blockwise")(*args)
    err = _rel_err(block, full)
    print(f"blockwise vs full {hw}: rel. err {err:.2e}")
    assert err < 1e-6

    loss = lambda impl: lambda *a: jnp.sum(jnp.sin(run(impl)(*a)))  # noqa: E731
    g_full = jax.grad(loss("full"), argnums=(0, 1, 2, 3, 4))(*args)
    g_block = jax.grad(loss("blockwise"), argnums=(0, 1, 2, 3, 4))(*args)
    for name, gb, gf in zip("q k v rh rw".split(), g_block, g_full):
        assert _rel_err(gb, gf) < 1e-5, name


@pytest.mark.parametrize("impl", ["full", "blockwise"])
def test_corner_queries_equal_the_full_grid_cropped(impl):
    # Queries of the top-left qh x qw corner only (an edge window's real tokens) against
    # every key: the same rows as the whole grid's attention, and the same gradients.
    H, W, qh, qw, hd = 6, 6, 2, 4, 8
    q, k, v, rh, rw = _inputs(2, 2, H, W, hd, seed=3)
    corner = lambda t: t.reshape(2, 2, H, W, hd)[:, :, :qh, :qw].reshape(2, 2, qh * qw, hd)  # noqa: E731

    def cropped(q, k, v, rh, rw):
        return corner(rpa.rel_pos_attention(q, k, v, rh, rw, 0.3, "full"))

    def direct(q, k, v, rh, rw):
        return rpa.rel_pos_attention(corner(q), k, v, rh[:qh], rw[:qw], 0.3, impl)

    assert _rel_err(direct(q, k, v, rh, rw), cropped(q, k, v, rh, rw)) < 1e-6
    grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2, 3, 4))(q, k, v, rh, rw)
             for f in (direct, cropped)]
    for name, gd, gc in zip("q k v rh rw".split(), *grads):
        assert _rel_err(gd, gc) < 1e-5, name


def test_mismatched_grids_are_refused():
    q, k, v, rh, rw = _inputs(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="do not match the rel-pos grids"):
        rpa.rel_pos_attention(q, k, v, rh[:2], rw, 0.5)


def test_blockwise_bf16_stays_close_to_float32():
    H = W = 16
    args32 = _inputs(1, 2, H, W, 16)
    args16 = tuple(a.astype(jnp.bfloat16) for a in args32)
    ref = rpa.rel_pos_attention(*args32, 0.25, "full")
    out = rpa.rel_pos_attention(*args16, 0.25, "blockwise", mixed=True)  # the cpu plan's path
    assert out.dtype == jnp.bfloat16
    assert _rel_err(out, ref) < 1e-2


def test_unknown_impl_is_refused():
    args = _inputs(1, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="unknown attention impl"):
        rpa.rel_pos_attention(*args, 0.5, "flash")
