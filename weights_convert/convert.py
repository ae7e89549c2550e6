"""PyTorch state dict -> converted weights directory, and back.

Every model variable is matched to its PyTorch key by `weights_convert.rules` (the same
table `weights_convert.torch_state` uses), against the model's structure built with
shapes only. Tensors are then read, converted and written one at a time, so memory
stays near one copy of the output. Any missing, unexpected or mis-shaped key stops the
conversion before anything is written.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from weights_convert import rules
from weights_convert.detect import NUMERICS, Detected, Family, detect, family_of, is_adapter_key, unused_keys
from weights_convert.pth import load_checkpoint
from weights_convert.store import (
    cheap_tracer_errors, abstract_model, mismatch_message, model_variables, path_name, write_dir,
)
from weights_convert.tensorfile import CheckpointError, PendingTensor, as_numpy
from weights_convert.workdir_model import model_source

PIXEL_NORMS = ("sam", "unit")
# Model constants that PyTorch registers as non-persistent buffers: never in a state dict,
# so taken from the model on import and left out on export.
NON_PERSISTENT = ("pixel_mean", "pixel_std")


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    variant: str = "auto"
    image_size: int | None = None  # None: the checkpoint's own
    adapters: bool = False  # add freshly initialised MSA adapters if the checkpoint has none
    adapter_zero_init: bool = False  # ... with a zero up-projection (model output unchanged)
    # The numerics below default (None) to what the detected family's own code does.
    prompt_free: bool | None = None  # FedFMS: the decoder ignores prompts
    pixel_norm: str | None = None  # "unit": images / 255 without SAM's mean/std (as FedFMS trains)
    pad_before_norm1: bool | None = None  # ViT: pad windows before norm1, as the MSA/FedFMS originals
    seed: int = 0  # for added adapters


def chosen_numerics(family: Family, opts: ConvertOptions) -> dict[str, Any]:
    """The family's numerics, each replaced by the option when one is given."""
    return {name: getattr(family.numerics, name) if getattr(opts, name) is None else getattr(opts, name)
            for name in NUMERICS}


def _is_torch_only(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in rules.TORCH_ONLY_SUFFIXES


def _torch_shape(path: tuple, flax_shape: tuple) -> tuple:
    dummy = np.broadcast_to(np.zeros((), np.float32), flax_shape)  # no memory: shape arithmetic only
    return tuple(rules.to_torch(path, dummy).shape)


def make_config(det: Detected, opts: ConvertOptions):
    from fedfms_jax.models.sam import SamConfig

    numerics = chosen_numerics(family_of(det), opts)
    if numerics["pixel_norm"] not in PIXEL_NORMS:
        raise CheckpointError(f"--pixel-norm must be one of {', '.join(PIXEL_NORMS)}, not {opts.pixel_norm!r}")
    size = opts.image_size or det.image_size
    kw: dict[str, Any] = dict(
        encoder=det.encoder, image_size=int(size), adapters=det.adapters or opts.adapters,
        prompt_free=bool(numerics["prompt_free"]), num_classes=det.num_classes, pixel_norm=numerics["pixel_norm"],
    )
    if opts.adapters and not det.adapters:
        kw["adapter_zero_init"] = opts.adapter_zero_init
    if numerics["pad_before_norm1"]:
        kw["pad_before_norm1"] = True
    if det.tiny_vit is not None:
        kw["tiny_vit"] = dataclasses.replace(det.tiny_vit, img_size=int(size))
    try:
        return SamConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"cannot build a model for this checkpoint: {e}") from None


def _resizer(key: str, src: tuple, dst: tuple) -> Callable[[np.ndarray], np.ndarray] | None:
    """How to bring a positional table to the new input size, or None if it is not one."""
    from fedfms_jax.models.image_encoder import resize_pos_embed, resize_rel_pos

    leaf = key.rsplit(".", 1)[-1]
    if leaf == "pos_embed" and len(src) == len(dst) == 4 and src[-1] == dst[-1]:
        return lambda a: resize_pos_embed(a, (dst[1], dst[2]))
    if leaf in ("rel_pos_h", "rel_pos_w") and len(src) == len(dst) == 2 and src[1] == dst[1]:
        return lambda a: resize_rel_pos(a, dst[0])
    return None


def plan(state_dict: Mapping[str, Any], config, *, resizing: bool, adding_adapters: bool, seed: int = 0):
    """Match the state dict to the model: (pending output tensors, torch-only values).

    Raises CheckpointError listing every missing, unexpected and mis-shaped key.
    """
    model = abstract_model(config)
    variables = model_variables(model)
    missing, misshaped, fresh, pending, used = [], [], [], [], set()
    for path, var in variables:
        key = rules.torch_key(path)
        flax_shape, dtype = tuple(var.get_value().shape), np.dtype(var.get_value().dtype)
        want = _torch_shape(path, flax_shape)
        if key not in state_dict:
            if (adding_adapters and is_adapter_key(key)) or key in NON_PERSISTENT:
                fresh.append((path, flax_shape, dtype))
            else:
                missing.append(key)
            continue
        used.add(key)
        have = tuple(state_dict[key].shape)
        transform = None
        if have != want:
            transform = _resizer(key, have, want) if resizing else None
            if transform is None:
                misshaped.append(f"{key}: checkpoint {have}, model expects {want}")
                continue

        def produce(path=path, key=key, transform=transform, dtype=dtype):
            value = as_numpy(state_dict[key])
            if transform is not None:
                value = transform(value)
            return np.asarray(rules.to_flax(path, value), dtype=dtype)

        pending.append(PendingTensor(path_name(path), flax_shape, dtype, produce))
    # Kept aside and restored on export: BatchNorm counters, and pixel statistics that some
    # SAM forks save as persistent buffers while this model holds them as constants.
    carried = [k for k in state_dict if k not in used and (_is_torch_only(k) or k in NON_PERSISTENT)]
    unexpected = [k for k in state_dict if k not in used and k not in carried]
    if missing or unexpected or misshaped:
        raise CheckpointError(mismatch_message(
            "checkpoint does not match the model (nothing written):", missing, unexpected, misshaped))
    if fresh:
        pending.extend(_fresh_tensors(config, fresh, seed))
    torch_only = {}
    for k in carried:
        value = as_numpy(state_dict[k])
        torch_only[k] = {"dtype": value.dtype.name, "shape": list(value.shape), "value": value.tolist()}
    return pending, torch_only


def _fresh_tensors(config, fresh, seed: int) -> list[PendingTensor]:
    """Initial values of added adapters and model constants: the model's own initialisers,
    traced once and compiled for just these variables (XLA drops every other one)."""
    import jax
    from flax import nnx

    from fedfms_jax.models.sam import build_sam

    wanted = [path_name(p) for p, _, _ in fresh]

    def init():
        model = build_sam(config, rngs=nnx.Rngs(seed))
        values = {path_name(p): v.get_value() for p, v in model_variables(model)}
        return {name: values[name] for name in wanted}

    with cheap_tracer_errors():
        values = jax.jit(init)()
    return [PendingTensor(path_name(p), shape, dtype, lambda v=values[path_name(p)], d=dtype: np.asarray(v, d))
            for p, shape, dtype in fresh]


def convert_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike,
                       opts: ConvertOptions = ConvertOptions(), *, force: bool = False) -> dict:
    """Convert a PyTorch checkpoint into a weights directory; returns a summary."""
    state_dict = load_checkpoint(checkpoint)
    det = detect(state_dict, opts.variant)
    family = family_of(det)
    config = make_config(det, opts)
    chosen = {name: getattr(config, name) for name in NUMERICS}
    adding = opts.adapters and not det.adapters
    unused = unused_keys(det, state_dict)  # kept aside, given back on export
    model_keys = {k: v for k, v in state_dict.items() if k not in unused}
    pending, torch_only = plan(model_keys, config, resizing=config.image_size != det.image_size,
                               adding_adapters=adding, seed=opts.seed)
    torch_only.update({k: _carried_entry(state_dict[k]) for k in unused})
    meta = {
        "source": {"checkpoint": Path(checkpoint).name, "keys": len(state_dict),
                   "image_size": det.image_size, "adapters": det.adapters},
        "detected": {"family": family.name, "evidence": family.evidence, "numerics": chosen,
                     "family_numerics": dataclasses.asdict(family.numerics),
                     "overridden": [n for n in NUMERICS if getattr(opts, n) is not None
                                    and getattr(opts, n) != getattr(family.numerics, n)]},
        "added_adapters": adding,
        "torch_only": torch_only,
        # How predict cuts volumes for this model: the original FedFMS code trains on
        # [X, Y] slices (nibabel's vol[:, :, z]); everything else on [Y, X], as viewers show.
        "slice_orientation": "xy" if family.name == "FedFMS" else "yx",
    }
    write_dir(out, config, pending, meta=meta, force=force)
    return {"detected": det.describe(), "family": family.name, "numerics": chosen,
            "choice": family.describe(chosen),
            "keys_used": len(state_dict), "tensors_written": len(pending),
            "image_size": config.image_size, "added_adapters": adding}


def _carried_entry(tensor) -> dict:
    value = as_numpy(tensor)
    return {"dtype": value.dtype.name, "shape": list(value.shape), "value": value.tolist()}


def _carried_value(entry) -> np.ndarray:
    return np.asarray(entry["value"], np.dtype(entry["dtype"])).reshape(entry["shape"])


def exported_state_dict(path: str | os.PathLike, round_: int | None = None) -> dict[str, np.ndarray]:
    """The weights at `path` as a PyTorch state dict (numpy arrays, PyTorch layouts and keys).

    `path` is a weights directory, or a training work dir: its final/ model, or the global
    model of checkpoint `round_` (see `workdir_model`).
    """
    source = model_source(path, round_)
    carried = source.doc.get("torch_only") or {}
    out: dict[str, np.ndarray] = {}
    for name, value in source.tensors.items():
        path_ = tuple(name.split("/"))
        key = rules.torch_key(path_)
        if key in NON_PERSISTENT:
            continue
        out[key] = np.asarray(rules.to_torch(path_, as_numpy(value)), order="C")  # plain contiguous tensors
        if key.endswith(".running_var"):  # torch keeps a batch counter after each BatchNorm
            counter = key[: -len("running_var")] + "num_batches_tracked"
            out[counter] = _carried_value(carried[counter]) if counter in carried else np.zeros((), np.int64)
    for key, entry in carried.items():
        out.setdefault(key, _carried_value(entry))
    config = source.doc.get("config") or {}
    if config.get("prompt_free") and "mask_decoder.seg1.weight" not in out:
        # The original FedFMS decoder always holds seg1 and ignores it for one class; a
        # (zero) one-class head keeps the family recognisable, so converting back picks
        # the prompt-free numerics the model was trained with.
        out["mask_decoder.seg1.weight"] = np.zeros((1, 4, 1, 1), np.float32)
        out["mask_decoder.seg1.bias"] = np.zeros((1,), np.float32)
    return out
