"""Decode the input tensors of an Open Inference Protocol v2 request and encode BYTES outputs.

A tensor arrives either as typed `contents` or as one `raw_input_contents` entry per input
(tritonclient sends raw by default): little-endian values, and for BYTES each element as a
4-byte little-endian length followed by its bytes. Anything malformed raises an ApiError
(INVALID_ARGUMENT) naming the tensor and what is wrong with it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from loraplex.v1 import kserve_v2_pb2 as pb

from .generate_request import ApiError

# datatype -> (struct code for one raw element, InferTensorContents field)
NUMERIC = {
    "BOOL": ("?", "bool_contents"),
    "INT8": ("b", "int_contents"), "INT16": ("h", "int_contents"), "INT32": ("i", "int_contents"),
    "INT64": ("q", "int64_contents"),
    "UINT8": ("B", "uint_contents"), "UINT16": ("H", "uint_contents"), "UINT32": ("I", "uint_contents"),
    "UINT64": ("Q", "uint64_contents"),
    "FP32": ("f", "fp32_contents"), "FP64": ("d", "fp64_contents"),
}
MAX_ELEMENTS = 2**64  # a shape's element count past which it is not computed further (see `elements`)
CONTENT_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                  "fp32_contents", "fp64_contents", "bytes_contents")


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: list[Any]  # flattened, row-major; bytes for BYTES, bool/int/float otherwise


def read_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    """Every input tensor of `request` by name, its values decoded and counted against its shape."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ApiError("INVALID_ARGUMENT", f"the request has {len(request.inputs)} inputs but "
                                           f"{len(raw)} raw_input_contents entries; give one per input or none")
    tensors: dict[str, Tensor] = {}
    for i, spec in enumerate(request.inputs):
        if not spec.name:
            raise ApiError("INVALID_ARGUMENT", f"input {i} has no name")
        if spec.name in tensors:
            raise ApiError("INVALID_ARGUMENT", f"input {spec.name!r} is given twice")
        shape = list(spec.shape)
        if any(d < 0 for d in shape):
            raise ApiError("INVALID_ARGUMENT", f"input {spec.name!r} has a negative dimension in shape {shown(shape)}")
        if raw:
            if spec.HasField("contents") and any(getattr(spec.contents, f) for f in CONTENT_FIELDS):
                raise ApiError("INVALID_ARGUMENT", f"input {spec.name!r} has both contents and raw_input_contents")
            values = _from_raw(spec.name, spec.datatype, raw[i])
        else:
            values = _from_contents(spec)
        count = elements(shape)
        if count != len(values):
            said = f"{count} elements" if count is not None else f"more than {MAX_ELEMENTS} elements"
            raise ApiError("INVALID_ARGUMENT", f"input {spec.name!r} has shape {shown(shape)} ({said}) but carries "
                                               f"{len(values)}")
        tensors[spec.name] = Tensor(spec.name, spec.datatype, shape, values)
    return tensors


def elements(shape: list[int]) -> int | None:
    """The element count of `shape` (no negative dims), or None once it is known to pass
    MAX_ELEMENTS (no request carries that many).

    A shape is never multiplied out whole: a request may hold hundreds of thousands of dims, and
    65,000 dims of 2**62 (a 650 KB request) took math.prod 19 s of CPU on the event loop; its
    product, over 4,300 digits, could not even be printed in the refusal."""
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count *= d
        if count > MAX_ELEMENTS:
            return None
    return count


def shown(shape: list[int], limit: int = 8) -> str:
    """`shape` as a refusal quotes it: its first dims, and how many there are beyond those."""
    if len(shape) <= limit:
        return str(shape)
    return f"[{', '.join(map(str, shape[:limit]))}, ...] ({len(shape)} dims)"


def _from_raw(name: str, datatype: str, data: bytes) -> list[Any]:
    if datatype == "BYTES":
        return _split_bytes(name, data)
    code = _numeric(name, datatype)[0]
    size = struct.calcsize("<" + code)
    if len(data) % size:
        raise ApiError("INVALID_ARGUMENT", f"input {name!r}: {len(data)} raw bytes is not a whole number of "
                                           f"{datatype} elements ({size} bytes each)")
    return list(struct.unpack(f"<{len(data) // size}{code}", data))


def _split_bytes(name: str, data: bytes) -> list[bytes]:
    values, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise ApiError("INVALID_ARGUMENT", f"input {name!r}: raw BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", data, at)
        at += 4
        if at + length > len(data):
            raise ApiError("INVALID_ARGUMENT", f"input {name!r}: a raw BYTES element claims {length} bytes but only "
                                               f"{len(data) - at} remain")
        values.append(data[at:at + length])
        at += length
    return values


def _from_contents(spec: pb.ModelInferRequest.InferInputTensor) -> list[Any]:
    field = "bytes_contents" if spec.datatype == "BYTES" else _numeric(spec.name, spec.datatype)[1]
    others = [f for f in CONTENT_FIELDS if f != field and getattr(spec.contents, f)]
    if others:
        raise ApiError("INVALID_ARGUMENT", f"input {spec.name!r} is {spec.datatype} but carries {others[0]}; "
                                           f"a {spec.datatype} tensor goes in {field}")
    return list(getattr(spec.contents, field))


def _numeric(name: str, datatype: str) -> tuple[str, str]:
    try:
        return NUMERIC[datatype]
    except KeyError:
        known = ", ".join(["BYTES", *NUMERIC])
        raise ApiError("INVALID_ARGUMENT", f"input {name!r} has datatype {datatype!r}; "
                                           f"this server reads {known}") from None


def bytes_output(name: str, values: list[bytes], shape: list[int]) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """A BYTES output tensor and its raw contents (Triton sends outputs raw; clients read both forms)."""
    raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype="BYTES", shape=shape), raw
