"""Prompt encoder + mask decoder (+ FedFMS variants) against PyTorch segment_anything 1.0.

Random weights everywhere (tokens, embeddings and the Fourier matrix included), random
image embeddings; one prompt set per image as official Sam.forward decodes them.
"""
import numpy as np
import pytest
import torch

from tests.conftest import stub_torchvision

# Installs stand-ins for the torchvision modules segment_anything imports but never uses.
stub_torchvision()

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from fedfms_jax.models.mask_decoder import MaskDecoder  # noqa: E402
from fedfms_jax.models.prompt_encoder import PromptEncoder  # noqa: E402
from weights_convert.torch_state import export_state_dict, load_state_dict  # noqa: E402
from fedfms_jax.reference.torch_fedfms_decoder import build_torch_fedfms_sam, randomize_  # noqa: E402

IMG = 256  # input image size: 16x16 embedding grid, 64x64 low-res masks
GRID = IMG // 16
B = 2
TOL = 1e-5


def rel_err(jax_value, torch_value) -> float:
    t = np.asarray(torch_value, np.float64)
    return float(np.linalg.norm(np.asarray(jax_value, np.float64) - t) / np.linalg.norm(t))


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def make_pair(prompt_free=False, num_classes=1, seed=0, dtype=jnp.float32):
    """A randomised torch SAM head and the Flax prompt encoder/decoder carrying its weights."""

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    tsam = randomize_(build_torch_fedfms_sam("vit_b", IMG, num_classes, prompt_free, encoder=Identity()), seed)
    sd = {k: v.numpy() for k, v in tsam.state_dict().items()}
    # Abstract build (no eager random init: slow on CPU), then strict load of every leaf.
    pe = nnx.eval_shape(lambda: PromptEncoder(256, (GRID, GRID), (IMG, IMG), 16, dtype=dtype, rngs=nnx.Rngs(0)))
    md = nnx.eval_shape(lambda: MaskDecoder(256, prompt_free=prompt_free, num_classes=num_classes,
                                            dtype=dtype, rngs=nnx.Rngs(0)))
    load_state_dict(pe, _sub(sd, "prompt_encoder."))
    load_state_dict(md, _sub(sd, "mask_decoder."))
    return tsam, pe, md


def prompts(kind: str, seed: int = 1):
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, IMG, (B, 3, 2)).astype(np.float32)
    labels = np.array([[1, 0, -1], [0, 1, 1]], np.int64)
    boxes = np.sort(rng.uniform(0, IMG, (B, 2, 2)), axis=1).reshape(B, 4).astype(np.float32)
    masks = rng.normal(size=(B, 4 * GRID, 4 * GRID, 1)).astype(np.float32)
    p = {
        "points": (coords, labels) if "point" in kind else None,
        "boxes": boxes if "box" in kind else None,
        "masks": masks if "mask" in kind else None,
    }
    return p


def run_torch(tsam, emb_nhwc, p, multimask):
    with torch.no_grad():
        pts = None if p["points"] is None else tuple(torch.from_numpy(a) for a in p["points"])
        boxes = None if p["boxes"] is None else torch.from_numpy(p["boxes"])
        masks = None if p["masks"] is None else torch.from_numpy(p["masks"].transpose(0, 3, 1, 2).copy())
        emb = torch.from_numpy(emb_nhwc.transpose(0, 3, 1, 2).copy())
        logits, iou = tsam.decode(emb, pts, boxes, masks, multimask)
    return logits.numpy().transpose(0, 2, 3, 1), iou.numpy()


def run_jax(pe, md, emb, p, multimask):
    sparse, dense = pe(p["points"], p["boxes"], p["masks"], batch_size=emb.shape[0])
    return md(jnp.asarray(emb), pe.get_dense_pe(), sparse, dense, multimask_output=multimask)


@pytest.fixture(scope="module")
def official():
    return make_pair()


@pytest.fixture(scope="module")
def embeddings():
    return np.random.default_rng(7).normal(size=(B, GRID, GRID, 256)).astype(np.float32)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("kind", ["point", "box", "mask", "none", "point+box", "point+box+mask"])
def test_prompted_decoder_matches_official(official, embeddings, kind, multimask):
    tsam, pe, md = official
    p = prompts(kind)
    t_logits, t_iou = run_torch(tsam, embeddings, p, multimask)
    j_logits, j_iou = run_jax(pe, md, embeddings, p, multimask)
    k = 3 if multimask else 1
    assert j_logits.shape == (B, 4 * GRID, 4 * GRID, k) and j_iou.shape == (B, k)
    e_logits, e_iou = rel_err(j_logits, t_logits), rel_err(j_iou, t_iou)
    print(f"decoder {kind:15s} multimask={multimask}: rel err logits {e_logits:.2e} iou {e_iou:.2e}")
    assert e_logits < TOL and e_iou < TOL


def test_prompt_encoder_outputs_and_dense_pe(official):
    tsam, pe, _ = official
    p = prompts("point+box+mask")
    with torch.no_grad():
        t_sparse, t_dense = tsam.prompt_encoder(
            (torch.from_numpy(p["points"][0]), torch.from_numpy(p["points"][1])),
            torch.from_numpy(p["boxes"]), torch.from_numpy(p["masks"].transpose(0, 3, 1, 2).copy()))
        t_pe = tsam.prompt_encoder.get_dense_pe()
    j_sparse, j_dense = pe(p["points"], p["boxes"], p["masks"])
    errs = (rel_err(j_sparse, t_sparse), rel_err(j_dense, t_dense.numpy().transpose(0, 2, 3, 1)),
            rel_err(pe.get_dense_pe(), t_pe.numpy().transpose(0, 2, 3, 1)))
    print("prompt encoder rel err sparse %.2e dense %.2e dense_pe %.2e" % errs)
    assert max(errs) < TOL
    # Padding point only when no box is given, as official.
    assert pe(p["points"], None, None)[0].shape == (B, 4, 256)
    assert pe(p["points"], p["boxes"], None)[0].shape == (B, 5, 256)
    assert pe(None, None, None, batch_size=3)[0].shape == (3, 0, 256)


def test_one_image_many_prompts_matches_repeat_interleave(official, embeddings):
    tsam, pe, md = official
    p = prompts("point")
    emb1 = embeddings[:1]
    with torch.no_grad():
        sparse, dense = tsam.prompt_encoder(tuple(torch.from_numpy(a) for a in p["points"]), None, None)
        t_logits, t_iou = tsam.mask_decoder(torch.from_numpy(emb1.transpose(0, 3, 1, 2).copy()),
                                            tsam.prompt_encoder.get_dense_pe(), sparse, dense, True)
    j_logits, j_iou = run_jax(pe, md, emb1, p, True)
    err = rel_err(j_logits, t_logits.numpy().transpose(0, 2, 3, 1))
    print(f"one embedding, {B} prompt sets: rel err logits {err:.2e}")
    assert j_logits.shape[0] == B and err < TOL and rel_err(j_iou, t_iou) < TOL


@pytest.mark.parametrize("num_classes,multimask", [(1, False), (2, False), (3, True)])
def test_fedfms_prompt_free_decoder(embeddings, num_classes, multimask):
    tsam, pe, md = make_pair(prompt_free=True, num_classes=num_classes, seed=3)
    # Prompts must not matter in prompt-free mode.
    t_logits, t_iou = run_torch(tsam, embeddings, prompts("none"), multimask)
    j_logits, j_iou = run_jax(pe, md, embeddings, prompts("point+box+mask"), multimask)
    k = num_classes if num_classes > 1 else (3 if multimask else 1)
    assert j_logits.shape == (B, 4 * GRID, 4 * GRID, k)
    e = rel_err(j_logits, t_logits), rel_err(j_iou, t_iou)
    print(f"prompt-free num_classes={num_classes} multimask={multimask}: rel err logits {e[0]:.2e} iou {e[1]:.2e}")
    assert max(e) < TOL
    if num_classes > 1:
        assert md.seg1.kernel.shape == (1, 1, 4, num_classes)


def test_decoder_state_dict_roundtrip(official):
    tsam, pe, md = official
    exported = export_state_dict(md)
    expected = {k[len("mask_decoder."):]: v for k, v in tsam.state_dict().items() if k.startswith("mask_decoder.")}
    assert set(exported) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)
    # The Fourier matrix is a buffer: exported, but not a Param.
    assert "pe_layer.positional_encoding_gaussian_matrix" in export_state_dict(pe)
    assert not nnx.state(pe, nnx.Param).to_pure_dict().get("pe_layer")


def test_bf16_decoder_close_to_fp32(embeddings):
    tsam, pe, md = make_pair(seed=5)
    _, pe16, md16 = make_pair(seed=5, dtype=jnp.bfloat16)
    p = prompts("point+box")
    ref, ref_iou = run_jax(pe, md, embeddings, p, True)
    low, low_iou = run_jax(pe16, md16, embeddings, p, True)
    err, err_iou = rel_err(low, ref), rel_err(low_iou, ref_iou)
    print(f"decoder bf16 vs fp32 rel err logits {err:.2e} iou {err_iou:.2e}")
    assert low.dtype == jnp.float32 and err < 1e-2 and err_iou < 3e-2
