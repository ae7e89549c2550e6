"""A converted model on disk: DIR/model.json + DIR/params.safetensors.

`model.json` holds the full `SamConfig` (encoder, input size, adapters, prompt mode,
classes, pixel normalisation, TinyViT settings) so that `load_model(DIR)` rebuilds the
matching model from DIR alone. `params.safetensors` holds every model variable in Flax
layout under its slash-joined NNX path (`image_encoder/blocks/0/attn/qkv/kernel`).
Directories are written to a temporary sibling and renamed into place, so a failed
write leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from weights_convert.tensorfile import CheckpointError, PendingTensor, read_safetensors, write_safetensors

FORMAT = "fedfms_jax.weights"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
PARAMS_FILE = "params.safetensors"


# ------------------------------------------------------------------ config <-> json

def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:  # dtypes: jnp.float32, np.dtype('bfloat16'), ...
        return np.dtype(value).name
    except TypeError:
        raise TypeError(f"cannot store config value {value!r} in {MODEL_JSON}") from None


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def config_to_json(cfg) -> dict:
    return _to_json(cfg)


def config_from_json(data: Mapping[str, Any]):
    """SamConfig from its `config_to_json` form (nested TinyViTConfig restored)."""
    from fedfms_jax.models.sam import SamConfig
    from fedfms_jax.models.tiny_vit import TinyViTConfig

    names = {f.name for f in dataclasses.fields(SamConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(f"{MODEL_JSON} has config fields this version does not know: {unknown}")
    kw = {k: _tuples(v) for k, v in data.items()}
    if isinstance(kw.get("tiny_vit"), Mapping):
        kw["tiny_vit"] = TinyViTConfig(**{k: _tuples(v) for k, v in kw["tiny_vit"].items()})
    return SamConfig(**kw)


def describe_config(cfg) -> dict:
    """The headline fields, also written at the top level of model.json for people."""
    get = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    return {
        "variant": get("encoder"), "image_size": get("image_size"), "adapters": get("adapters"),
        "prompt_free": get("prompt_free"), "num_classes": get("num_classes"), "pixel_norm": get("pixel_norm"),
    }


# ------------------------------------------------------------------ variables

def model_variables(model) -> list[tuple[tuple, Any]]:
    """(path, Variable) for every variable of an NNX model, in graph order."""
    from flax import nnx

    return [(p, v) for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable) and not isinstance(v, nnx.RngState)]


def path_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


# ------------------------------------------------------------------ writing

def _prepare_target(directory: Path, force: bool) -> None:
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(f"{directory} exists and is not a directory")
        if any(directory.iterdir()) and not force:
            raise CheckpointError(f"{directory} exists and is not empty; pass --force to replace it")


def write_dir(directory: str | os.PathLike, config, tensors: Iterable[PendingTensor], *,
              meta: Mapping[str, Any] | None = None, force: bool = False) -> Path:
    """Write model.json + params atomically: into a temporary sibling, then rename."""
    directory = Path(directory)
    _prepare_target(directory, force)
    tensors = list(tensors)
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "params": PARAMS_FILE, "layout": "flax_nnx",
        **describe_config(config),
        "stored_values": int(sum(np.prod(t.shape, dtype=np.int64) for t in tensors)),  # params + buffers
        "config": config_to_json(config),
        **(dict(meta) if meta else {}),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        write_safetensors(tmp / PARAMS_FILE, tensors, {"format": FORMAT})
        (tmp / MODEL_JSON).write_text(json.dumps(doc, indent=2) + "\n")
        if directory.exists():  # empty, or replaced under --force
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_weights(directory: str | os.PathLike, model, config, *, meta: Mapping[str, Any] | None = None,
                 force: bool = False) -> Path:
    """Write a built model (e.g. after federated training) and its SamConfig to `directory`."""
    tensors = []
    for path, var in model_variables(model):
        value = var.get_value()
        tensors.append(PendingTensor(path_name(path), tuple(value.shape), np.dtype(value.dtype),
                                     lambda value=value: np.asarray(value)))
    return write_dir(directory, config, tensors, meta=meta, force=force)


# ------------------------------------------------------------------ reading

def read_meta(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / MODEL_JSON
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MODEL_JSON}: not a converted weights directory")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {doc.get('format_version')}; "
                              f"this version reads up to {FORMAT_VERSION}")
    return doc


def read_params(directory: str | os.PathLike):
    """name -> LazyTensor of the stored Flax variables."""
    doc = read_meta(directory)
    tensors, _ = read_safetensors(Path(directory) / doc.get("params", PARAMS_FILE))
    return tensors


def mismatch_message(title: str, missing, unexpected, misshaped) -> str:
    lines = [title]
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            lines.append(f"  {name} ({len(keys)}):")
            lines.extend(f"    {k}" for k in keys)
    return "\n".join(lines)


@contextlib.contextmanager
def cheap_tracer_errors():
    """Flax probes each traced initialiser's `.sharding`; jax answers with an AttributeError
    whose message walks the whole trace, which makes tracing a ViT-B's init quadratic
    (about 18 s instead of 2 s here). The message is discarded, so skip building it."""
    try:
        from jax._src.interpreters import partial_eval as pe
    except ImportError:  # internals moved: trace at the normal speed
        yield
        return
    original = getattr(pe.DynamicJaxprTracer, "_origin_msg", None)
    if original is None:
        yield
        return
    pe.DynamicJaxprTracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        pe.DynamicJaxprTracer._origin_msg = original


def abstract_model(config):
    """The model's structure with shapes only: nothing allocated, nothing initialised."""
    from flax import nnx

    from fedfms_jax.models.sam import build_sam

    with cheap_tracer_errors():
        return nnx.eval_shape(lambda: build_sam(config, rngs=nnx.Rngs(0)))


# Leaves a pretrained SAM never has: MSA adapters and FedFMS's multi-class `seg1` head. A
# model that wants them and loads weights without them starts them from its own init.
ADAPTER_LEAF = re.compile(r"(^|/)(Space|MLP|Depth)_Adapter/")
SEG1_LEAF = re.compile(r"^mask_decoder/seg1/")


def is_added_leaf(name: str) -> bool:
    return bool(ADAPTER_LEAF.search(name) or SEG1_LEAF.search(name))


def needs_own_init(config, names: Iterable[str]) -> bool:
    """Whether a model of `config` has leaves that the stored `names` lack and that keep the
    model's own initialisation (decided from the config: nothing is built to find out)."""
    names = list(names)
    no_adapters = not any(ADAPTER_LEAF.search(n) for n in names)
    no_seg1 = not any(SEG1_LEAF.search(n) for n in names)
    return bool((config.adapters and no_adapters) or (config.num_classes > 1 and no_seg1))


class MismatchError(CheckpointError):
    """Stored tensors that do not fit a model; the message lists every offending name."""

    def __init__(self, title: str, missing, unexpected, misshaped):
        super().__init__(mismatch_message(title, missing, unexpected, misshaped))
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)


def fill_model(model, tensors: Mapping[str, Any], *, title: str, keep_init=lambda name: False) -> list[str]:
    """Copy stored Flax-layout tensors into `model`'s variables by name, cast to each
    variable's dtype; returns the names left at their init (only those `keep_init` allows).

    Any other missing name, any unexpected or mis-shaped tensor raises CheckpointError
    listing every one of them, before anything is changed.
    """
    import jax.numpy as jnp

    variables = model_variables(model)
    missing, misshaped, kept, used = [], [], [], set()
    for path, var in variables:
        name = path_name(path)
        t = tensors.get(name)
        if t is None:
            (kept if keep_init(name) else missing).append(name)
        elif tuple(t.shape) != tuple(var.get_value().shape):
            misshaped.append(f"{name}: stored {tuple(t.shape)}, model expects {tuple(var.get_value().shape)}")
        used.add(name)
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected or misshaped:
        raise MismatchError(title, missing, unexpected, misshaped)
    for path, var in variables:
        name = path_name(path)
        if name in tensors:
            var.set_value(jnp.asarray(np.asarray(tensors[name]), dtype=var.get_value().dtype))
    return kept


def build_loaded(config, tensors: Mapping[str, Any], *, title: str, seed: int = 0):
    """(model, names kept at init): a model of `config` built once and filled from `tensors`.

    When the tensors cover every leaf the model is built with shapes only (about 10x
    faster than a real init); a real init only when some leaves keep their own values.
    """
    from flax import nnx

    from fedfms_jax.models.sam import build_sam

    if not needs_own_init(config, tensors):
        model = abstract_model(config)
        return model, fill_model(model, tensors, title=title)
    model = build_sam(config, rngs=nnx.Rngs(seed))
    return model, fill_model(model, tensors, title=title, keep_init=is_added_leaf)


def load_model(directory: str | os.PathLike):
    """(SamConfig, Sam) rebuilt from DIR, every variable filled from the stored params."""
    doc = read_meta(directory)
    config = config_from_json(doc["config"])
    model = abstract_model(config)
    fill_model(model, read_params(directory),
               title=f"{directory}: stored parameters do not match the model its {MODEL_JSON} describes:")
    return config, model
