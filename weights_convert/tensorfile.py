"""Tensors read lazily from files, and a streaming safetensors reader/writer.

A checkpoint is described first (names, dtypes, shapes) and read one tensor at a
time, so converting a 375 MB ViT-B never holds more than the output plus one tensor.
bfloat16 is widened to float32 exactly (the bf16 bits are the top half of an fp32).
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import zipfile
from typing import Callable, Iterable, Mapping

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (CLI exit code 2)."""


BF16 = "bf16"  # marker: stored as uint16 bit patterns, returned as float32


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a storage's bytes are: a byte offset in a plain file, or a zip member."""

    path: str
    offset: int = 0  # absolute byte offset of the storage (plain / stored zip member)
    member: str | None = None  # set when the zip member is compressed: read through zipfile

    def read(self, start: int, nbytes: int) -> bytes:
        if self.member is not None:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                f.seek(start)
                return f.read(nbytes)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start)
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointError(f"{self.path} is truncated (wanted {nbytes} bytes at {self.offset + start})")
        return data


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor in a file; `np.asarray(t)` reads it. Shape/dtype are known without reading."""

    location: Location
    storage_dtype: str  # numpy dtype string with byte order ('<f4'), or BF16
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements, as in PyTorch
    offset: int = 0  # in elements, into the storage
    big_endian: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.storage_dtype == BF16 else np.dtype(self.storage_dtype).newbyteorder("=")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def _raw_dtype(self) -> np.dtype:
        dt = np.dtype(np.uint16) if self.storage_dtype == BF16 else np.dtype(self.storage_dtype)
        return dt.newbyteorder(">" if self.big_endian else "<") if dt.itemsize > 1 else dt

    def numpy(self) -> np.ndarray:
        raw = self._raw_dtype()
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        # Only the span of storage this view touches is read.
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides))
        buf = np.frombuffer(self.location.read(self.offset * raw.itemsize, span * raw.itemsize), raw)
        if not self.shape:  # as_strided treats shape () as "keep the buffer's shape"
            arr = buf[:1].reshape(())
        else:
            arr = np.lib.stride_tricks.as_strided(
                buf, self.shape, tuple(s * raw.itemsize for s in self.strides), writeable=False
            )
        if self.storage_dtype == BF16:
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return np.array(arr, dtype=self.dtype, order="C")  # ascontiguousarray would make () into (1,)

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyTensor({self.storage_dtype}, shape={self.shape})"


def as_numpy(value) -> np.ndarray:
    return value.numpy() if isinstance(value, LazyTensor) else np.asarray(value)


# ---------------------------------------------------------------- safetensors

_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": BF16, "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "|i1", "U8": "|u1", "BOOL": "|b1",
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items() if v != BF16}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """(name -> LazyTensor, metadata) of a .safetensors file, reading only its header."""
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or n > os.path.getsize(path) - 8:
            raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path} is not a safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out = {}
    for name, info in header.items():
        dt = _ST_DTYPES.get(info.get("dtype"))
        if dt is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        shape = tuple(int(s) for s in info["shape"])
        strides = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
        begin, _ = info["data_offsets"]
        out[name] = LazyTensor(Location(path, base + int(begin)), dt, shape, strides)
    return out, meta


@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """An output tensor announced by name/shape/dtype before its data is produced."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]


def write_safetensors(path: str | os.PathLike, tensors: Iterable[PendingTensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors one at a time: the header first, then each array as produced."""
    tensors = list(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        dt = np.dtype(t.dtype)
        if dt not in _NP_TO_ST:
            raise ValueError(f"{t.name}: dtype {dt} cannot be stored in safetensors")
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * dt.itemsize
        header[t.name] = {"dtype": _NP_TO_ST[dt], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            arr = np.asarray(t.produce(), dtype=np.dtype(t.dtype).newbyteorder("<"), order="C")
            if arr.shape != tuple(t.shape):
                raise ValueError(f"{t.name}: produced shape {arr.shape}, announced {tuple(t.shape)}")
            f.write(memoryview(arr).cast("B"))


def file_kind(path: str | os.PathLike) -> str:
    """'zip' (torch >= 1.6 .pth), 'legacy' (older torch pickle), 'safetensors' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and len(head) >= 2 and head[1] <= 5:
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def stored_member_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored (uncompressed) zip member's data, from its local header."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip entry {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len
