"""Read a safetensors file by hand: check its header before a single tensor is read, then read
the tensors' bytes straight into memory torch owns.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and ``data_offsets``, then the tensor data. :func:`read_header` reads only the first
two parts and checks everything about them that can go wrong: the header length, the JSON, that
every tensor is floating point with a sane shape, that its offsets span exactly the bytes that
shape needs, that no two tensors overlap, that the file is not truncated, and that the tensors
fit under a size cap. :func:`read_tensors` then reads the vetted file in slices of
:data:`READ_SLICE_BYTES` (each inside ``with pace():``, see `interleave`) and hands out views of
that one buffer, refusing a file that changed since its header was checked. Every refusal is an
:class:`AdapterError`.

Nothing here unpickles: no ``torch.load``, no ``pickle``, no safetensors loader (see
:func:`read_tensors` for why not even safetensors' own).
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapter_errors import AdapterError, is_int, short
from .bounded_json import JSONLimitError, load_json

__all__ = [
    "MAX_HEADER_BYTES",
    "FLOAT_DTYPES",
    "FLOAT_ITEMSIZE",
    "READ_SLICE_BYTES",
    "Pace",
    "TensorInfo",
    "read_header",
    "read_tensors",
    "slices_of",
]

# safetensors' own loader refuses headers above this size; never be looser than the loader.
MAX_HEADER_BYTES = 100_000_000
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
FLOAT_ITEMSIZE = {name: dtype.itemsize for name, dtype in FLOAT_DTYPES.items()}
MAX_NDIM = 8  # adapter weights are matrices; torch itself stops at 64
# Bytes read (or scaled) per piece of a paced load: a few milliseconds of work.
READ_SLICE_BYTES = 1024**2

Pace = Callable[[], AbstractContextManager]  # `with pace():` around each piece of a load


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

    @property
    def nbytes(self) -> int:
        """The length of the tensor's byte span."""
        return self.end - self.begin


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
            _check_header_length(header_len, file_size, f"{where}: {name}")
            raw = fh.read(header_len)
    except OSError as exc:
        raise AdapterError(f"{where}: cannot read {name}: {exc}") from None
    try:
        header = load_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{where}: {name} has a corrupt header (not valid JSON)") from None
    except JSONLimitError as exc:
        raise AdapterError(f"{where}: {name} has a corrupt header (its JSON {exc})") from None
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


def _check_header_length(header_len: int, file_size: int, where: str) -> None:
    """Refuse a header length over the limit or past the file's end, without echoing it: it is
    just the file's first 8 bytes, whatever file was named (a secret's, say), read as a number."""
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise AdapterError(
            f"{where} does not start with a valid safetensors header length: the first 8 bytes must give "
            f"the JSON header's size, at most {MAX_HEADER_BYTES} bytes and no more than the file holds (the "
            f"file is only {file_size} bytes); the file is corrupt, truncated or not safetensors"
        )


def _parse_entry(key: str, entry: Any, where: str) -> TensorInfo:
    """One header entry as a :class:`TensorInfo`: floating dtype, valid shape, offsets that fit it."""
    if not isinstance(entry, dict):
        raise AdapterError(f"{where}: header entry for tensor {short(key)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in FLOAT_ITEMSIZE:
        raise AdapterError(
            f"{where}: tensor {short(key)} has dtype {short(dtype)}; adapter weights must be floating point "
            f"({', '.join(FLOAT_ITEMSIZE)})"
        )
    if not isinstance(shape, list) or not all(is_int(d) and 0 <= d < 2**63 for d in shape):
        raise AdapterError(f"{where}: tensor {short(key)} has an invalid shape {short(shape)}")
    if len(shape) > MAX_NDIM:  # and so its element count stays a number a message can print
        raise AdapterError(f"{where}: tensor {short(key)} has {len(shape)} dimensions, over {MAX_NDIM}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)
    ) or offsets[1] < offsets[0]:
        raise AdapterError(f"{where}: tensor {short(key)} has invalid data_offsets {short(offsets)}")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    expected = info.numel * FLOAT_ITEMSIZE[dtype]
    if info.nbytes != expected:
        raise AdapterError(
            f"{where}: tensor {short(key)} ({dtype} {list(shape)}) needs {expected} bytes but its data_offsets "
            f"span {info.nbytes}"
        )
    return info


def _check_layout(tensors: dict[str, TensorInfo], where: str, data_size: int, max_bytes: int) -> None:
    """Refuse tensors over ``max_bytes`` in total, overlapping spans, or spans past the file's end."""
    total = sum(t.nbytes for t in tensors.values())
    if total > max_bytes:
        raise AdapterError(f"{where}: tensors total {total} bytes, over the limit of {max_bytes} bytes")
    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    for (prev_key, prev), (key, cur) in zip(ordered, ordered[1:]):
        if cur.begin < prev.end:
            raise AdapterError(f"{where}: tensors {short(prev_key)} and {short(key)} overlap; the header is corrupt")
    promised = max((t.end for t in tensors.values()), default=0)
    if promised > data_size:
        raise AdapterError(
            f"{where}: truncated: header promises {promised} bytes of tensor data, file has {data_size}"
        )


def read_tensors(
    weights: Path, keys: list[str], infos: dict[str, TensorInfo], where: str, pace: Pace = nullcontext
) -> dict[str, torch.Tensor]:
    """The tensors `keys` of a vetted safetensors file, as views of one buffer holding the file.

    The file is read straight into memory torch owns (the read releases the GIL, and nothing is
    copied a second time), so this holds the GIL only for a few short Python steps. That matters
    because it runs on the reader thread beside the engine's: `safetensors.torch.load(bytes)` held
    the GIL for 7-25 ms per rank-64 adapter, stopping the engine thread as long. Each copy into
    fresh memory also costs a page fault per 4 KiB. (`safe_open(...).get_tensor` also keeps two
    small objects per call for good in safetensors 0.8.)"""
    try:
        size = weights.stat().st_size
        data = torch.empty(size, dtype=torch.uint8)
        buffer = _memory_of(data)
        got = _read_into(weights, buffer, pace)
        (header_len,) = struct.unpack_from("<Q", buffer, 0)
        header = load_json(bytes(buffer[8 : 8 + header_len]))
    except (OSError, ValueError, struct.error) as exc:  # vetted already: I/O, or changed underneath
        raise AdapterError(f"{where}: cannot read {weights.name}: {exc}") from None
    if got != size:
        raise AdapterError(f"{where}: {weights.name} changed on disk while loading; try again")
    start = 8 + header_len
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        info, entry = infos[key], header.get(key)
        if (not isinstance(entry, dict) or entry.get("dtype") != info.dtype
                or tuple(entry.get("shape", ())) != info.shape or entry.get("data_offsets") != [info.begin, info.end]
                or start + info.end > size):
            raise AdapterError(f"{where}: {short(key)} changed on disk while loading; try again")
        dtype = FLOAT_DTYPES[info.dtype]
        raw = data[start + info.begin : start + info.end]
        if (start + info.begin) % FLOAT_ITEMSIZE[info.dtype]:
            raw = raw.clone()  # a misaligned span cannot be viewed as its dtype
        out[key] = raw.view(dtype).view(info.shape)
    return out


_memoryview_of = ctypes.pythonapi.PyMemoryView_FromMemory
_memoryview_of.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_memoryview_of.restype = ctypes.py_object
_PYBUF_WRITE = 0x200


def _memory_of(data: torch.Tensor) -> memoryview:
    """A writable byte view of the uint8 CPU tensor `data` [n] (its own memory, not a copy). Not a
    ctypes array: ctypes keeps one array type per length for good, a leak across file sizes."""
    return _memoryview_of(data.data_ptr(), data.numel(), _PYBUF_WRITE)


def _read_into(path: Path, buffer: memoryview, pace: Pace = nullcontext) -> int:
    """Fill `buffer` from the file, `READ_SLICE_BYTES` per `pace()`; returns the bytes read (fewer
    if the file shrank)."""
    got = 0
    with open(path, "rb", buffering=0) as fh:
        while got < len(buffer):
            with pace():
                n = fh.readinto(buffer[got : got + READ_SLICE_BYTES])
            if not n:
                break
            got += n
    return got


def slices_of(items: list, nbytes: Callable[[Any], int]) -> list[list]:
    """`items` in order, cut into runs of about `READ_SLICE_BYTES` (by `nbytes` of each): the pieces
    of work after a paced read (scaling, checking values) are cut to the read's own size."""
    out: list[list] = [[]]
    size = 0
    for item in items:
        if out[-1] and size + nbytes(item) > READ_SLICE_BYTES:
            out.append([])
            size = 0
        out[-1].append(item)
        size += nbytes(item)
    return out
