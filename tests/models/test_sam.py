"""The assembled Sam: parameter counts, config errors, golden arrays (no torch needed),
and parity with official segment_anything 1.0 / the FedFMS PyTorch reference.

Weights are drawn from a numpy seed over the Flax model's PyTorch-layout keys and loaded
strictly into both frameworks, so key names and shapes are checked both ways.
Regenerate the goldens (needs torch):  python -m tests.models.test_sam --regenerate
"""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.models.sam import SamConfig, build_sam, count_params, preprocess
from weights_convert.torch_state import export_state_dict, load_state_dict
from weights_convert import rules

GOLDEN = Path(__file__).resolve().parents[1] / "testdata" / "sam_vit_tiny_golden.npz"
TOL = 1e-5
TINY = dict(encoder="vit_tiny", image_size=160)  # 10x10 embedding grid, 40x40 low-res masks
FEDFMS_TINY = dict(TINY, adapters=True, prompt_free=True, num_classes=2, pad_before_norm1=True, pixel_norm="unit")
# (prompt kinds, multimask_output)
CASES = [("point", False), ("point", True), ("box", False), ("mask", True), ("none", False),
         ("point+box+mask", True)]
# A subset of CASES (same shapes: JAX's per-op compile cache is shared within a process).
GOLDEN_CASES = [("point", True), ("mask", True), ("none", False)]


def rel_err(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def abstract_sam(cfg: SamConfig):
    return nnx.eval_shape(lambda: build_sam(cfg, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=4)
def _state_dict_cached(cfg: SamConfig, seed: int) -> dict:
    return numpy_state_dict(abstract_sam(cfg), seed)


def state_dict_for(cfg: SamConfig, seed: int) -> dict:
    """Cached: the abstract build of a ViT-B takes seconds on a busy CPU."""
    return _state_dict_cached(cfg, seed)


def numpy_state_dict(model, seed: int) -> dict[str, np.ndarray]:
    """Seeded random weights for every variable of `model`, PyTorch keys and layouts.
    Scales: weights 1/sqrt(fan_in), norms ~1, biases and positions ~0.1, embeddings,
    tokens and the Fourier matrix ~1 (so no part of the model is left at a trivial init)."""
    entries = []
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            key = rules.torch_key(path)
            shape = rules.to_torch(path, np.empty(var.get_value().shape, np.float32)).shape
            entries.append((key, str(path[-1]), shape))
    rng = np.random.default_rng(seed)
    out = {}
    for key, leaf, shape in sorted(entries):
        noise = rng.standard_normal(shape).astype(np.float32)
        name = key.rsplit(".", 1)[-1]
        if name == "running_var":
            out[key] = (1.0 + 0.1 * np.abs(noise)).astype(np.float32)
        elif leaf == "embedding" or "gaussian" in name:
            out[key] = noise
        elif name in ("bias", "running_mean") or "pos" in name:
            out[key] = 0.1 * noise
        elif len(shape) == 1:
            out[key] = 1.0 + 0.1 * noise
        else:
            out[key] = noise / np.float32(math.sqrt(shape[1] * math.prod(shape[2:])))
    return out


def loaded_sam(cfg: SamConfig, sd: dict):
    model = abstract_sam(cfg)
    load_state_dict(model, sd)
    return model


def inputs(cfg: SamConfig, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    s, g = cfg.image_size, cfg.embedding_size
    return dict(
        images=rng.integers(0, 256, (batch, s, s, 3)).astype(np.float32),
        coords=rng.uniform(0, s, (batch, 2, 2)).astype(np.float32),
        labels=np.tile(np.array([[1, 0]], np.int64), (batch, 1)),
        boxes=np.sort(rng.uniform(0, s, (batch, 2, 2)), axis=1).reshape(batch, 4).astype(np.float32),
        masks=rng.normal(size=(batch, 4 * g, 4 * g, 1)).astype(np.float32),
    )


def prompt_args(x: dict, kind: str) -> dict:
    return dict(
        points=(x["coords"], x["labels"]) if "point" in kind else None,
        boxes=x["boxes"] if "box" in kind else None,
        mask_inputs=x["masks"] if "mask" in kind else None,
    )


def jax_outputs(model, x: dict, cases, pixel_norm: str) -> dict:
    emb = model.embed(preprocess(x["images"], pixel_norm))
    out = {"embeddings": np.asarray(emb)}
    for kind, mm in cases:
        logits, iou = model.decode(emb, **prompt_args(x, kind), multimask_output=mm)
        out[f"{kind}|{mm}|logits"], out[f"{kind}|{mm}|iou"] = np.asarray(logits), np.asarray(iou)
    return out


def compare(got: dict, want: dict, label: str, tol: float = TOL):
    worst = 0.0
    for key, ref in want.items():
        assert got[key].shape == ref.shape, (key, got[key].shape, ref.shape)
        err = rel_err(got[key], ref)
        print(f"{label} {key}: rel err {err:.2e}")
        worst = max(worst, err)
    assert worst < tol, f"{label}: worst rel err {worst:.2e} >= {tol}"


# ---------------------------------------------------------------- no torch needed


def test_param_counts_vit_b():
    base = abstract_sam(SamConfig())
    counts = [count_params(m) for m in (base, base.image_encoder, base.prompt_encoder, base.mask_decoder)]
    print("ViT-B SAM params total/encoder/prompt/decoder:", counts)
    assert counts == [93_735_472, 89_670_912, 6_220, 4_058_340]
    adapted = abstract_sam(SamConfig(adapters=True, prompt_free=True, num_classes=2))
    print("with MSA adapters + seg1(2):", count_params(adapted))
    assert count_params(adapted) - counts[0] == 10_651_392 + 4 * 2 + 2
    # The Fourier matrix is a buffer, not a parameter.
    assert count_params(nnx.state(base.prompt_encoder)) == 6_220


@pytest.mark.parametrize("kwargs,needle", [
    (dict(image_size=1000), "not divisible by the vit_b patch size 16"),
    (dict(encoder="vit_x"), "encoder"),
    (dict(num_classes=0), "num_classes"),
    (dict(pixel_norm="imagenet"), "pixel_norm"),
    (dict(dtype="float16"), "dtype"),
    (dict(adapter_zero_init=True), "needs adapters=True"),
    (dict(tiny_vit="lite_medsam"), "encoder='tiny_vit'"),
    (dict(encoder="tiny_vit", tiny_vit="lite_medsam"), "set image_size=256"),
    (dict(encoder="tiny_vit", tiny_vit="nope", image_size=256), "unknown TinyViT preset"),
])
def test_config_errors_say_what_to_fix(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamConfig(**kwargs)


def test_preprocess():
    x = np.array([[[[0, 128, 255]]]], np.uint8)
    np.testing.assert_allclose(preprocess(x, "unit"), x / 255.0, rtol=1e-7)
    want = (x - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    np.testing.assert_allclose(preprocess(x, "sam"), want, rtol=1e-6)
    assert preprocess(x, "sam").dtype == jnp.float32


def test_state_dict_roundtrip_tiny_vit_with_batchnorm():
    cfg = SamConfig(encoder="tiny_vit", tiny_vit="lite_medsam", image_size=256)
    model = abstract_sam(cfg)
    sd = numpy_state_dict(model, seed=1)
    sd_torch = dict(sd, **{k[: -len("running_mean")] + "num_batches_tracked": np.zeros((), np.int64)
                           for k in sd if k.endswith(".running_mean")})
    broken = dict(sd)
    del broken["mask_decoder.iou_token.weight"]
    broken["extra.weight"] = np.zeros(1, np.float32)
    broken["prompt_encoder.no_mask_embed.weight"] = np.zeros((1, 3), np.float32)
    with pytest.raises(ValueError) as err:
        load_state_dict(model, broken)
    for needle in ("mask_decoder.iou_token.weight", "extra.weight", "prompt_encoder.no_mask_embed.weight"):
        assert needle in str(err.value)
    load_state_dict(model, sd_torch)  # strict: num_batches_tracked consumed
    exported = export_state_dict(model)
    assert set(exported) == set(sd_torch)
    for k, v in sd_torch.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_golden_vit_tiny():
    """Official-architecture SAM (vit_tiny sizes) and the FedFMS variant against stored
    PyTorch outputs; runs without torch."""
    gold = dict(np.load(GOLDEN))
    for name, kw, seed in (("official", TINY, 0), ("fedfms", FEDFMS_TINY, 1)):
        cfg = SamConfig(**kw)
        model = loaded_sam(cfg, state_dict_for(cfg, seed))
        want = {k.split("/", 1)[1]: v for k, v in gold.items() if k.startswith(name + "/")}
        got = jax_outputs(model, inputs(cfg, 2), GOLDEN_CASES, cfg.pixel_norm)
        compare(got, want, f"golden {name}")


# ---------------------------------------------------------------- PyTorch parity


def _torch():
    from tests.conftest import stub_torchvision

    stub_torchvision()
    from fedfms_jax.reference import torch_fedfms_decoder

    return torch_fedfms_decoder


def torch_model(cfg: SamConfig, sd: dict, ref):
    import torch

    tsam = ref.build_torch_fedfms_sam(cfg.encoder, cfg.image_size, cfg.num_classes, cfg.prompt_free,
                                      cfg.adapters, pad_before_norm1=cfg.pad_before_norm1)
    tsam.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    return tsam


def torch_outputs(tsam, x: dict, cases, pixel_norm: str) -> dict:
    """FedFMS reference path: normalised NCHW images, one prompt set per image."""
    import torch

    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        emb = tsam.image_encoder(nchw(np.asarray(preprocess(x["images"], pixel_norm))))
        out = {"embeddings": emb.numpy().transpose(0, 2, 3, 1)}
        for kind, mm in cases:
            p = prompt_args(x, kind)
            pts = None if p["points"] is None else tuple(torch.from_numpy(a) for a in p["points"])
            boxes = None if p["boxes"] is None else torch.from_numpy(p["boxes"])
            masks = None if p["mask_inputs"] is None else nchw(p["mask_inputs"])
            logits, iou = tsam.decode(emb, pts, boxes, masks, mm)
            out[f"{kind}|{mm}|logits"] = logits.numpy().transpose(0, 2, 3, 1)
            out[f"{kind}|{mm}|iou"] = iou.numpy()
    return out


def official_sam_outputs(tsam, x: dict, cases) -> dict:
    """segment_anything.modeling.Sam.forward itself (its own normalisation and per-image loop)."""
    import torch
    from segment_anything.modeling import Sam as OfficialSam

    sam = OfficialSam(tsam.image_encoder, tsam.prompt_encoder, tsam.mask_decoder).eval()
    out = {}
    for kind, mm in cases:
        p = prompt_args(x, kind)
        batch = []
        for i, img in enumerate(x["images"]):
            rec = {"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                   "original_size": img.shape[:2]}
            if p["points"] is not None:
                rec["point_coords"] = torch.from_numpy(p["points"][0][i:i + 1])
                rec["point_labels"] = torch.from_numpy(p["points"][1][i:i + 1])
            if p["boxes"] is not None:
                rec["boxes"] = torch.from_numpy(p["boxes"][i:i + 1])
            if p["mask_inputs"] is not None:
                rec["mask_inputs"] = torch.from_numpy(np.ascontiguousarray(p["mask_inputs"][i:i + 1].transpose(0, 3, 1, 2)))
            batch.append(rec)
        res = sam(batch, multimask_output=mm)
        out[f"{kind}|{mm}|logits"] = np.concatenate([r["low_res_logits"].numpy().transpose(0, 2, 3, 1) for r in res])
        out[f"{kind}|{mm}|iou"] = np.concatenate([r["iou_predictions"].numpy() for r in res])
    return out


def check_against_torch(cfg: SamConfig, batch: int, cases, seed: int, official: bool):
    ref = _torch()
    sd = state_dict_for(cfg, seed)
    tsam = torch_model(cfg, sd, ref)
    x = inputs(cfg, batch)
    got = jax_outputs(loaded_sam(cfg, sd), x, cases, cfg.pixel_norm)
    want = torch_outputs(tsam, x, cases, cfg.pixel_norm)
    label = f"{cfg.encoder}@{cfg.image_size}"
    compare(got, want, label)
    if official:
        compare(got, official_sam_outputs(tsam, x, cases), label + " official Sam.forward")
    return got


def test_vit_tiny_sam_matches_official():
    check_against_torch(SamConfig(**TINY), 2, CASES, seed=0, official=True)


def test_fedfms_variant_vit_tiny_matches_reference():
    # Prompt-free + seg1 (2 classes) + MSA adapters (originals' padding order), x / 255 input.
    check_against_torch(SamConfig(**FEDFMS_TINY), 2, [("none", False), ("point+box", True)], seed=1,
                        official=False)


def test_bf16_close_to_fp32_vit_tiny():
    cfg = SamConfig(**TINY)
    x, sd = inputs(cfg, 2), state_dict_for(cfg, 0)
    ref = jax_outputs(loaded_sam(cfg, sd), x, [("point", True)], "sam")
    low = jax_outputs(loaded_sam(SamConfig(**TINY, dtype="bfloat16"), sd), x, [("point", True)], "sam")
    errs = {k: rel_err(low[k], ref[k]) for k in ref}
    print("vit_tiny bf16 encoder vs fp32 rel err:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert errs["point|True|logits"] < 1e-2


@pytest.mark.slow
def test_official_sam_vit_b_256():
    got = check_against_torch(SamConfig(image_size=256), 2, CASES, seed=2, official=True)
    cfg16 = SamConfig(image_size=256, dtype="bfloat16")
    sd = state_dict_for(cfg16, 2)
    low = jax_outputs(loaded_sam(cfg16, sd), inputs(cfg16, 2), CASES[:2], "sam")
    errs = {k: rel_err(low[k], got[k]) for k in low}
    print("vit_b@256 bf16 vs fp32 rel err:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(v for k, v in errs.items() if k.endswith("logits")) < 1e-2


@pytest.mark.slow
def test_fedfms_variant_vit_b_256_matches_reference():
    cfg = SamConfig(image_size=256, adapters=True, prompt_free=True, num_classes=2,
                    pad_before_norm1=True, pixel_norm="unit")
    check_against_torch(cfg, 1, [("none", False)], seed=3, official=False)


@pytest.mark.slow
def test_official_sam_vit_b_1024():
    check_against_torch(SamConfig(), 1, [("point", True), ("box+mask", False)], seed=4, official=True)


# ---------------------------------------------------------------- goldens


def regenerate_goldens(path: Path = GOLDEN) -> None:
    ref = _torch()
    arrays = {}
    for name, kw, seed in (("official", TINY, 0), ("fedfms", FEDFMS_TINY, 1)):
        cfg = SamConfig(**kw)
        tsam = torch_model(cfg, state_dict_for(cfg, seed), ref)
        for k, v in torch_outputs(tsam, inputs(cfg, 2), GOLDEN_CASES, cfg.pixel_norm).items():
            arrays[f"{name}/{k}"] = v.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
    if "--regenerate" not in sys.argv:
        sys.exit("usage: python -m tests.models.test_sam --regenerate")
    import tests.conftest  # noqa: F401  (highest matmul precision, CPU)

    regenerate_goldens()
