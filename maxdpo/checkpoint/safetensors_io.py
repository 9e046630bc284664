"""Streaming safetensors reader/writer on numpy (bfloat16 through ml_dtypes), one tensor at a time.

Reading memory-maps the file, so a tensor is only paged in when asked for; corrupt headers or truncated
data raise `CheckpointError` naming the file and tensor.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from maxdpo.atomic import atomic_path

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, corrupt or of the wrong shape; the message names it."""


class SafetensorsFile:
    """Lazy view of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError(f"header length {header_len} exceeds file size {size}")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, struct.error) as err:
            raise CheckpointError(f"corrupt or unreadable safetensors file {self.path}: {err}") from err
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self.data_offset = 8 + header_len
        self.data_size = size - self.data_offset

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise CheckpointError(f"tensor '{name}' not found in {self.path}")
        entry = self.entries[name]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor '{name}' in {self.path} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end > self.data_size or end - start != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"tensor '{name}' in {self.path} is truncated or its offsets are corrupt")
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_offset + start, shape=shape)


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict | None = None) -> None:
    """Writes (name, array) pairs to `path` atomically."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, array in tensors:
        nbytes = array.size * array.dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, array in tensors:
            f.write(np.ascontiguousarray(array).tobytes())
