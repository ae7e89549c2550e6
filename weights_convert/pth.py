"""Read PyTorch `.pth` checkpoints without torch and without running their code.

A torch >= 1.6 checkpoint is a zip: `<prefix>/data.pkl` (a pickle whose tensors are
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls) and one
`<prefix>/data/<key>` member of raw bytes per storage. The pickle is replayed by an
unpickler that resolves only the handful of globals a state dict needs to names
defined here; anything else (os.system, builtins.eval, a module class) is refused
before it can be called. Tensors come back as `LazyTensor`s: nothing is read yet.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

from weights_convert.tensorfile import (
    BF16, CheckpointError, LazyTensor, Location, file_kind, read_safetensors, stored_member_offset,
)


class UnsafeCheckpointError(CheckpointError):
    """The pickle asks for something other than tensors and plain containers."""


_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": BF16,
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "|i1",
    "ByteStorage": "|u1", "BoolStorage": "|b1", "UntypedStorage": "|u1",
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    def __init__(self, location: Location, dtype: str, numel: int, big_endian: bool):
        self.location, self.dtype, self.numel, self.big_endian = location, dtype, numel, big_endian


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> LazyTensor:
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("tensor rebuilt from something that is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s < 0 for s in size + stride) or len(size) != len(stride):
        raise CheckpointError(f"tensor with invalid size {size} / stride {stride}")
    span = 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
    if int(storage_offset) + span > storage.numel:
        raise CheckpointError("tensor reaches past the end of its storage")
    return LazyTensor(storage.location, storage.dtype, size, stride, int(storage_offset), storage.big_endian)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, state=None):
    if not isinstance(data, LazyTensor):
        raise UnsafeCheckpointError("parameter rebuilt from something that is not a tensor")
    return data


def _numpy_scalar(dtype, data=None):
    # numpy scalars (e.g. a 'best_dice' next to the state dict) are plain bytes + dtype.
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafeCheckpointError("numpy scalar with an object dtype")
    return np.frombuffer(data, dtype)[0]


def _numpy_dtype(name, align=False, copy=False):
    dt = np.dtype(name)
    if dt.hasobject:
        raise UnsafeCheckpointError("numpy object dtype")
    return dt


def _codecs_encode(text, encoding="latin1"):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafeCheckpointError("unexpected _codecs.encode call")
    return text.encode("latin1")


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _codecs_encode,
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class _RestrictedUnpickler(pickle._Unpickler):  # pure-Python unpickler: BUILD can be overridden
    def __init__(self, data: bytes, resolve_storage, source: str):
        super().__init__(io.BytesIO(data))
        self._resolve_storage = resolve_storage
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {self._source}: its pickle calls {module}.{name}, which is not a "
                "tensor or plain container (the file may try to run code). Only state dicts of tensors "
                "can be read; re-save a trusted file with torch.save(model.state_dict(), ...)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"refusing to load {self._source}: unknown persistent id")
        _, stype, key, _location, numel = pid
        return self._resolve_storage(str(key), stype.dtype, int(numel))

    def load_build(self):
        # Only state-dict metadata (OrderedDict attributes such as `_metadata`) may be set.
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            return  # the state restates what np.dtype(name) already built; never applied
        if type(inst) is not collections.OrderedDict or not isinstance(state, dict):
            raise UnsafeCheckpointError(f"refusing to load {self._source}: pickle sets state on {type(inst).__name__}")
        inst.__dict__.update(state)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def read_pth(path: str | os.PathLike) -> Any:
    """The object saved in a zip-format `.pth`, tensors as LazyTensor. Never runs its code."""
    path = str(path)
    kind = file_kind(path)
    if kind == "legacy":
        raise CheckpointError(
            f"{path} uses PyTorch's legacy (pre-1.6, non-zip) format, which cannot be read safely; "
            "re-save it with a current torch: torch.save(torch.load(f, weights_only=True), g)"
        )
    if kind != "zip":
        raise CheckpointError(f"{path} is not a PyTorch zip checkpoint")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path} is not a readable zip checkpoint ({e})") from None
    with zf:
        infos = {i.filename: i for i in zf.infolist()}
        pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            hint = " (a TorchScript archive?)" if any(n.endswith("constants.pkl") for n in infos) else ""
            raise CheckpointError(f"{path} has no data.pkl{hint}")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = zf.read(prefix + "byteorder").strip() if prefix + "byteorder" in infos else b"little"
        data = zf.read(pkl[0])

    big_endian = byteorder == b"big"
    storages: dict[str, _Storage] = {}

    def resolve(key: str, dtype: str, numel: int) -> _Storage:
        if key not in storages:
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise CheckpointError(f"{path}: storage data/{key} is missing")
            itemsize = 2 if dtype == BF16 else np.dtype(dtype).itemsize
            if info.file_size < numel * itemsize:
                raise CheckpointError(f"{path}: storage data/{key} is shorter than its {numel} elements")
            if info.compress_type == zipfile.ZIP_STORED:
                loc = Location(path, stored_member_offset(path, info))
            else:
                loc = Location(path, 0, info.filename)
            storages[key] = _Storage(loc, dtype, numel, big_endian)
        return storages[key]

    try:
        return _RestrictedUnpickler(data, resolve, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # a malformed pickle: say so in one line
        raise CheckpointError(f"{path}: cannot read its pickle ({type(e).__name__}: {e})") from None


_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "net", "module")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, (LazyTensor, np.ndarray)) for k, v in obj.items()
    )


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, LazyTensor]:
    """The state dict inside `obj`: itself, or under "model"/"state_dict"/...; strips a
    DataParallel `module.` prefix."""
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        found = f"keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{source} holds no state dict of tensors (found {found})")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_checkpoint(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """State dict (key -> LazyTensor) of a `.pth` or `.safetensors` file, read safely."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if file_kind(path) == "safetensors":
        tensors, _ = read_safetensors(path)
        return unwrap_state_dict(tensors, path)
    return unwrap_state_dict(read_pth(path), path)


def load_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """State dict of a `.pth`/`.safetensors` file as numpy arrays (all read now), safely."""
    return {k: v.numpy() for k, v in load_checkpoint(path).items()}
