"""Regex partition: presets, user rules, coverage assertion, split/merge round trip,
ViT-B communication sizes from shapes."""
import jax
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.federated import comm
from fedfms_jax.federated.partition import make_partition
from fedfms_jax.losses import bce_with_logits, dice_bce
from tests.federated import tiny


@pytest.fixture(scope="module")
def model():
    return nnx.eval_shape(lambda: tiny.TinySam(depth=2, rngs=nnx.Rngs(0)))


def _trainable(p):
    return set(p.trainable_paths)


def test_presets(model):
    paths = make_partition(model, "fedsam").paths
    sam = make_partition(model, "fedsam")
    assert _trainable(sam) == set(paths)
    msa = make_partition(model, "fedmsa")
    expect = {p for p in paths if "_Adapter/" in p or not p.startswith("image_encoder/")}
    assert _trainable(msa) == expect
    assert any("Depth_Adapter" in p for p in expect) and any(p.startswith("prompt_encoder/") for p in expect)
    assert "image_encoder/blocks/1/attn/qkv/kernel" in msa.frozen_paths
    dec = make_partition(model, "decoder")
    assert _trainable(dec) == {p for p in paths if p.startswith("mask_decoder/")}
    # buffers are not parameters: never in either subtree
    assert not any("pe_gaussian" in p for p in paths)


def test_user_rules_first_match_wins_and_coverage(model):
    rules = [(r"blocks/0/", "frozen"), (r"^image_encoder/blocks/", "trainable"), (r".*", False)]
    p = make_partition(model, rules)
    assert all(q.startswith("image_encoder/blocks/1/") for q in p.trainable_paths)
    assert p.count(True) + p.count(False) == sum(int(np.prod(s)) for s in p.shapes)
    with pytest.raises(ValueError, match="match no rule") as e:
        make_partition(model, [(r"^image_encoder/", True)])
    assert "mask_decoder/out/kernel" in str(e.value)
    with pytest.raises(ValueError, match="unknown partition preset"):
        make_partition(model, "fedxyz")


def test_split_merge_round_trip(model):
    state = nnx.state(model, nnx.Param)
    p = make_partition(state, "fedmsa")
    tr, fr = p.split(state)
    assert len(jax.tree.leaves(tr)) == len(p.trainable_paths)
    assert len(jax.tree.leaves(fr)) == len(p.frozen_paths)
    back = p.merge(tr, fr)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        assert a is b


def test_losses_match_torch():
    import torch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 8, 2)).astype(np.float32) * 3
    y = (rng.random((3, 8, 8, 2)) < 0.3).astype(np.uint8)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.0))(
        torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))).item()
    np.testing.assert_allclose(float(bce_with_logits(x, y, pos_weight=2.0)), ref, rtol=1e-5)
    # padded rows change nothing: the mean is over valid rows only
    xp = np.concatenate([x, 100 * np.ones_like(x[:1])])
    yp = np.concatenate([y, np.zeros_like(y[:1])])
    valid = np.array([True, True, True, False])
    np.testing.assert_allclose(float(bce_with_logits(xp, yp, valid)), ref, rtol=1e-6)
    np.testing.assert_allclose(float(dice_bce(xp, yp, valid)), float(dice_bce(x, y)), rtol=1e-6)


@pytest.mark.slow
def test_vit_b_comm_bytes_from_shapes():
    from fedfms_jax.models.sam import SamConfig, build_sam

    msa = nnx.eval_shape(lambda: build_sam(SamConfig(encoder="vit_b", adapters=True), rngs=nnx.Rngs(0)))
    sam = nnx.eval_shape(lambda: build_sam(SamConfig(encoder="vit_b"), rngs=nnx.Rngs(0)))
    p_msa = make_partition(msa, "fedmsa")
    p_sam = make_partition(sam, "fedsam")
    assert comm.comm_bytes(p_msa) == 14_715_952 * 4
    assert comm.comm_bytes(p_sam) == 93_735_472 * 4
    # on 2-D data Depth adapters get no gradient: a sender of non-zero leaves ships less
    touched = np.array(["Depth_Adapter" not in q for q in p_msa.trainable_paths])
    assert comm.comm_bytes(p_msa, only_nonzero_grad=True, touched=touched) == 11_165_488 * 4
    assert p_msa.count(False) == 89_670_912
