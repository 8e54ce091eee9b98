"""Parse and check a safetensors header by hand, before a single tensor is read.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and ``data_offsets``, then the tensor data. :func:`read_header` reads only the first
two parts and checks everything about them that can go wrong: the header length, the JSON, that
every tensor is floating point with a sane shape, that its offsets span exactly the bytes that
shape needs, that no two tensors overlap, that the file is not truncated, and that the tensors
fit under a size cap. Every refusal is an :class:`AdapterError`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapter_errors import AdapterError, is_int, short

__all__ = ["MAX_HEADER_BYTES", "FLOAT_DTYPES", "FLOAT_ITEMSIZE", "TensorInfo", "read_header"]

# safetensors' own loader refuses headers above this size; never be looser than the loader.
MAX_HEADER_BYTES = 100_000_000
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
FLOAT_ITEMSIZE = {name: dtype.itemsize for name, dtype in FLOAT_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: dtype name, shape and byte span within the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(weights: Path, where: str, max_bytes: int) -> dict[str, TensorInfo]:
    """Parse and check the safetensors header by hand, reading no tensor data."""
    name = weights.name
    try:
        file_size = weights.stat().st_size
        with open(weights, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise AdapterError(f"{where}: {name} is {file_size} bytes, too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise AdapterError(
                    f"{where}: {name} claims a {header_len}-byte header (limit {MAX_HEADER_BYTES}); "
                    "the file is corrupt or not safetensors"
                )
            if 8 + header_len > file_size:
                raise AdapterError(
                    f"{where}: {name} claims a {header_len}-byte header but the file is only {file_size} bytes; "
                    "the file is corrupt or truncated"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise AdapterError(f"{where}: cannot read {name}: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{where}: {name} has a corrupt header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{where}: {name} has a corrupt header (not a JSON object)")

    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            if entry is not None and not isinstance(entry, dict):
                raise AdapterError(f"{where}: {name} has a corrupt header (__metadata__ is not an object)")
            continue
        tensors[key] = _parse_entry(key, entry, f"{where}: {name}")

    _check_layout(tensors, f"{where}: {name}", file_size - 8 - header_len, max_bytes)
    return tensors


def _parse_entry(key: str, entry: Any, where: str) -> TensorInfo:
    """One header entry as a :class:`TensorInfo`: floating dtype, valid shape, offsets that fit it."""
    if not isinstance(entry, dict):
        raise AdapterError(f"{where}: header entry for tensor {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in FLOAT_ITEMSIZE:
        raise AdapterError(
            f"{where}: tensor {key!r} has dtype {dtype!r}; adapter weights must be floating point "
            f"({', '.join(FLOAT_ITEMSIZE)})"
        )
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise AdapterError(f"{where}: tensor {key!r} has an invalid shape {short(shape)}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)
    ) or offsets[1] < offsets[0]:
        raise AdapterError(f"{where}: tensor {key!r} has invalid data_offsets {short(offsets)}")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    expected = info.numel * FLOAT_ITEMSIZE[dtype]
    if info.end - info.begin != expected:
        raise AdapterError(
            f"{where}: tensor {key!r} ({dtype} {list(shape)}) needs {expected} bytes but its data_offsets "
            f"span {info.end - info.begin}"
        )
    return info


def _check_layout(tensors: dict[str, TensorInfo], where: str, data_size: int, max_bytes: int) -> None:
    """Refuse tensors over ``max_bytes`` in total, overlapping spans, or spans past the file's end."""
    total = sum(t.end - t.begin for t in tensors.values())
    if total > max_bytes:
        raise AdapterError(f"{where}: tensors total {total} bytes, over the limit of {max_bytes} bytes")
    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    for (prev_key, prev), (key, cur) in zip(ordered, ordered[1:]):
        if cur.begin < prev.end:
            raise AdapterError(f"{where}: tensors {prev_key!r} and {key!r} overlap; the header is corrupt")
    promised = max((t.end for t in tensors.values()), default=0)
    if promised > data_size:
        raise AdapterError(
            f"{where}: truncated: header promises {promised} bytes of tensor data, file has {data_size}"
        )
