"""Write a PyTorch state dict (`.pth`) of plain tensors, with or without torch.

Without torch the zip layout of `torch.save` is written directly: `archive/data.pkl`
(a protocol-2 pickle of an OrderedDict whose values are `_rebuild_tensor_v2` calls on
persistent storages), one 64-byte-aligned `archive/data/<i>` member per tensor, and the
`version`/`byteorder` records. `torch.load(weights_only=True)` reads it.
"""
from __future__ import annotations

import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

_STORAGE_NAMES = {
    np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
    np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage", np.dtype("int16"): "ShortStorage",
    np.dtype("int8"): "CharStorage", np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage",
}
_ALIGN = 64


# ------------------------------------------------------------------ pickle opcodes

def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    if 0 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _state_dict_pickle(entries: list[tuple[str, str, int, tuple[int, ...]]]) -> bytes:
    """entries: (key, storage type name, numel, shape), storage key = entry index."""
    empty_od = _global("collections", "OrderedDict") + b")R"
    out = [b"\x80\x02", empty_od]
    for start in range(0, len(entries), 1000):  # SETITEMS in batches, as pickle does
        out.append(b"(")
        for i, (key, stype, numel, shape) in enumerate(entries[start:start + 1000], start):
            strides = [int(np.prod(shape[j + 1:], dtype=np.int64)) for j in range(len(shape))]
            pid = _tuple([_str("storage"), _global("torch", stype), _str(str(i)), _str("cpu"), _int(numel)])
            args = _tuple([pid + b"Q", _int(0), _tuple([_int(s) for s in shape]),
                           _tuple([_int(s) for s in strides]), b"\x89", empty_od])
            out.append(_str(key) + _global("torch._utils", "_rebuild_tensor_v2") + args + b"R")
        out.append(b"u")
    out.append(b".")
    return b"".join(out)


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A stored member whose data starts on a 64-byte boundary (as torch.save writes)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    start = zf.fp.tell() + 30 + len(name.encode()) + 4  # local header + name + extra id/len
    pad = -start % _ALIGN
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def write_pth_native(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """torch.save-compatible zip of `state_dict` (numpy arrays), written without torch."""
    arrays = []
    for key, value in state_dict.items():
        arr = np.asarray(value)
        if arr.dtype not in _STORAGE_NAMES:
            raise ValueError(f"{key}: dtype {arr.dtype} has no PyTorch storage type here")
        arrays.append((key, np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")))
    entries = [(k, _STORAGE_NAMES[a.dtype.newbyteorder("=")], a.size, a.shape) for k, a in arrays]
    records = [("data.pkl", _state_dict_pickle(entries)), ("byteorder", b"little"),
               (".format_version", b"1"), (".storage_alignment", str(_ALIGN).encode())]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(_aligned_info(zf, f"archive/{name}", len(data)), data)
        for i, (_, arr) in enumerate(arrays):
            with zf.open(_aligned_info(zf, f"archive/data/{i}", arr.nbytes), "w") as f:
                f.write(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
        zf.writestr(_aligned_info(zf, "archive/version", 2), b"3\n")


def write_pth_torch(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    import torch

    def tensor(v):
        v = np.asarray(v, order="C")
        return torch.from_numpy(v if v.flags.writeable else v.copy())  # shares memory when it can

    torch.save({k: tensor(v) for k, v in state_dict.items()}, str(path))


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def write_pth(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, *,
              writer: str = "auto", force: bool = False) -> str:
    """Write `state_dict` to `path` atomically; returns the writer used ('torch'/'native').

    writer: 'torch' (torch.save), 'native' (no torch), 'auto' (torch when importable).
    Refuses to replace an existing file unless `force`.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it")
    if writer == "auto":
        writer = "torch" if torch_available() else "native"
    if writer not in ("torch", "native"):
        raise ValueError(f"unknown writer {writer!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        (write_pth_torch if writer == "torch" else write_pth_native)(state_dict, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return writer
