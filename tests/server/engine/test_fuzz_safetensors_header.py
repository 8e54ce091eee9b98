"""Fuzzing the safetensors header parser (`safetensors_file.read_header`), an adapter upload's
first untrusted bytes.

The property: whatever a file holds, `read_header` either accepts it, and then every entry it
returns is one the loader can read safely (a float dtype, offsets that span exactly its shape's
bytes inside the file, no overlaps, under the size cap), or refuses it with `AdapterError`; it
never lets another exception out (TypeError from an unhashable dtype, ValueError from a 5,000-digit
integer, RecursionError from deep nesting, ...) and never takes long. Files are built from a valid
header and then mutated: any JSON value in any field, numbers at the limits (-1, 2**63, 2**64,
10**400, NaN, 1e999), a lying length prefix, truncated or padded data, invalid UTF-8 and deep
nesting; fully random bytes are tried too.

Runs are fixed (derandomized, no example database) so they cannot flake; a longer run is one
command, e.g.

    LORAPLEX_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/server/engine/test_fuzz_safetensors_header.py -k fuzz
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fuzzing import Raw, any_json, dump, fuzz, refused
from hypothesis import example, given
from hypothesis import strategies as st

from loraplex.server.engine.adapter_errors import AdapterError
from loraplex.server.engine.safetensors_file import FLOAT_ITEMSIZE, MAX_HEADER_BYTES, read_header

# ---------------------------------------------------------------------------- JSON values

RAW_TOKENS = [Raw("1" * 5000), Raw("-" + "9" * 4301), Raw("1" * 4300), Raw("1e999"), Raw("-1e999"), Raw("NaN"),
              Raw("Infinity"), Raw("-0"), Raw("1E400"), Raw('"\\ud800"'), Raw('"\\u0000"'), Raw("[" * 100 + "]" * 100),
              Raw('{"a":' * 70 + "1" + "}" * 70), Raw("[" * 5000 + "]" * 5000)]
EDGE_INTS = [-1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63, 10**30, 10**400]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 1.0]
EDGE_STRINGS = ["", "F32", "\x00", "\ud800", "x" * 10_000]
json_values = any_json(EDGE_INTS, EDGE_FLOATS, EDGE_STRINGS, st.sampled_from(RAW_TOKENS), max_leaves=12)


# ---------------------------------------------------------------------------- files

ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class SafetensorsFile:
    """A file to parse: `header` (JSON text bytes), the 8-byte length it claims, and data bytes."""

    header: bytes
    data_len: int
    claimed_len: int | None = None  # None: the header's true length

    def __repr__(self) -> str:  # a 600 KB header is shown by its start and its length
        shown = self.header if len(self.header) <= 2000 else self.header[:2000] + b"... (%d bytes)" % len(self.header)
        return f"SafetensorsFile({shown!r}, data_len={self.data_len}, claimed_len={self.claimed_len})"

    def content(self) -> bytes:
        length = len(self.header) if self.claimed_len is None else self.claimed_len
        return struct.pack("<Q", length) + self.header + b"\x00" * self.data_len


@st.composite
def valid_entries(draw: st.DrawFn) -> tuple[dict[str, dict], int]:
    """A valid header's tensor entries, laid out back to back, and the data size they need."""
    entries: dict[str, dict] = {}
    at = 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = math.prod(shape) * ITEMSIZE[dtype]
        entries[f"base_model.model.t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        at += size
    return entries, at


BIG_INTS = [2**63 - 1, 2**64, 10**100, 10**4299, 3 * 10**4299]  # 10**4299 has 4,300 digits, int()'s limit
ints = st.integers(-3, 20) | st.sampled_from(EDGE_INTS + BIG_INTS) | st.sampled_from(RAW_TOKENS[:5])
many_dims = st.integers(100, 3000).map(lambda n: [2**63 - 1] * n)


def field_values(name: str) -> st.SearchStrategy:
    """Values for one entry field: any JSON, or the field's own type at its limits."""
    near = {"dtype": st.sampled_from(["F32", "f32", "I32", "U8", "BOOL", "F8_E4M3", ""]),
            "shape": st.lists(ints, max_size=4) | many_dims,
            "data_offsets": st.lists(ints, min_size=0, max_size=3)}[name]
    return near | json_values


@st.composite
def consistent_entries(draw: st.DrawFn) -> dict:
    """An entry whose offsets span exactly what its (possibly astronomical) shape needs."""
    dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
    shape = draw(st.lists(st.integers(0, 3) | st.sampled_from(BIG_INTS), min_size=1, max_size=3))
    begin = draw(st.sampled_from([0, 8]) | st.sampled_from(BIG_INTS))
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + math.prod(shape) * ITEMSIZE[dtype]]}


@st.composite
def mutated_headers(draw: st.DrawFn) -> tuple[Any, int]:
    """A header value (dict, or any JSON) and the data size its valid version needed."""
    entries, size = draw(valid_entries())
    header: Any = {k: dict(v) for k, v in entries.items()}
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["field", "drop", "entry", "consistent", "metadata", "overlap", "whole"]))
        keys = sorted(k for k, v in header.items() if isinstance(v, dict)) if isinstance(header, dict) else []
        if op == "field" and keys:
            name = draw(st.sampled_from(FIELDS))
            header[draw(st.sampled_from(keys))][name] = draw(field_values(name))
        elif op == "drop" and keys:
            header[draw(st.sampled_from(keys))].pop(draw(st.sampled_from(FIELDS)), None)
        elif op == "entry" and isinstance(header, dict):
            header[draw(st.text(max_size=8))] = draw(json_values)
        elif op == "consistent" and isinstance(header, dict):
            header[draw(st.sampled_from(keys + ["big"]))] = draw(consistent_entries())
        elif op == "metadata" and isinstance(header, dict):
            header["__metadata__"] = draw(json_values)
        elif op == "overlap" and len(keys) >= 2:
            a, b = draw(st.permutations(keys))[:2]
            header[a]["data_offsets"] = header[b].get("data_offsets")
        elif op == "whole":
            header = draw(json_values)
    return header, size


def corrupt_bytes(text: bytes, draw: st.DrawFn) -> bytes:
    """`text` as is, or with invalid UTF-8 spliced in, or cut short."""
    how = draw(st.sampled_from(["keep", "keep", "invalid utf-8", "cut"]))
    at = draw(st.integers(0, len(text)))
    if how == "invalid utf-8":
        return text[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])) + text[at:]
    if how == "cut":
        return text[:at]
    return text


@st.composite
def safetensors_files(draw: st.DrawFn) -> SafetensorsFile:
    header, size = draw(mutated_headers())
    text = corrupt_bytes(dump(header).encode("utf-8", "surrogatepass"), draw)
    text += b" " * draw(st.sampled_from([0, 0, 1, 7]))  # safetensors pads headers with spaces
    data_len = max(0, size + draw(st.sampled_from([0, 0, 0, -1, 1, -size, 1000])))
    claimed = draw(st.sampled_from([None, None, None, 0, 1, 2**63, 2**64 - 1, MAX_HEADER_BYTES + 1])
                   | st.integers(0, len(text) + data_len + 8))
    return SafetensorsFile(text, data_len, claimed)


# ---------------------------------------------------------------------------- the property

MAX_BYTES = 1 << 10  # the size cap read_header is given: small, so that fuzzed headers hit it


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """One file path, rewritten for every example (a module-scoped fixture: hypothesis reuses it)."""
    return tmp_path_factory.mktemp("fuzz-safetensors") / "adapter_model.safetensors"


def names_the_adapter(exc: Exception) -> None:
    assert str(exc).startswith("fuzz"), "a refusal names the adapter it is about"


def parse(weights: Path, content: bytes) -> None:
    """Write `content`, parse it; an accepted header must describe a file the loader can read."""
    weights.write_bytes(content)
    no, tensors = refused(lambda: read_header(weights, "fuzz", MAX_BYTES), (AdapterError,), names_the_adapter)
    if no:
        return
    (header_len,) = struct.unpack("<Q", content[:8])
    data_size = len(content) - 8 - header_len
    spans = sorted((t.begin, t.end) for t in tensors.values())
    assert "__metadata__" not in tensors
    for info in tensors.values():
        assert info.dtype in FLOAT_ITEMSIZE
        assert all(isinstance(d, int) and d >= 0 for d in info.shape)
        assert 0 <= info.begin <= info.end <= data_size
        assert info.nbytes == math.prod(info.shape) * FLOAT_ITEMSIZE[info.dtype]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "accepted spans never overlap"
    assert sum(t.nbytes for t in tensors.values()) <= MAX_BYTES


@given(safetensors_files())
# Found by this test (minimal examples; each fails on the defect named):
# TypeError: unhashable type 'list', from `dtype not in FLOAT_ITEMSIZE` (_parse_entry)
@example(SafetensorsFile(b'{"base_model.model.t0":{"dtype":[],"shape":[],"data_offsets":[0,2]}}', 2))
# ValueError: json.loads refused an integer over 4,300 digits with a plain ValueError (load_json; since
# fixed in the working tree by bounded_json's digit limit, kept so it stays fixed)
@example(SafetensorsFile(b'{"base_model.model.t0":{"shape":[],"data_offsets":[0,2]},"__metadata__":'
                         + b"1" * 5000 + b"}", 2))
# ValueError: the refusal's message formats numel * itemsize, an integer over 4,300 digits (_parse_entry)
@example(SafetensorsFile(b'{"t":{"dtype":"F32","shape":[' + b",".join([b"9223372036854775807"] * 228)
                         + b'],"data_offsets":[0,4]}}', 4))
# and 30,000 such dims (a 600 KB header): math.prod holds the GIL about 3 s first (TensorInfo.numel);
# once the message is fixed, TooSlow unless the product is bounded as it is computed
@example(SafetensorsFile(b'{"t":{"dtype":"F32","shape":[' + b",".join([b"9223372036854775807"] * 30_000)
                         + b'],"data_offsets":[0,4]}}', 4))
@fuzz(600)
def test_fuzz_read_header_accepts_or_refuses_mutated_files(weights: Path, case: SafetensorsFile) -> None:
    parse(weights, case.content())


@given(st.binary(max_size=64) | st.binary(min_size=8, max_size=8).map(lambda b: b + b"{}" + b"\x00" * 16))
@fuzz(300)
def test_fuzz_read_header_accepts_or_refuses_random_bytes(weights: Path, content: bytes) -> None:
    parse(weights, content)


@given(valid_entries())
@fuzz(100)
def test_fuzz_read_header_accepts_every_valid_header(weights: Path, layout: tuple[dict[str, dict], int]) -> None:
    entries, size = layout
    weights.write_bytes(SafetensorsFile(json.dumps(entries).encode(), size).content())
    tensors = read_header(weights, "fuzz", 1 << 20)
    assert {k: (t.dtype, list(t.shape), [t.begin, t.end]) for k, t in tensors.items()} == {
        k: (e["dtype"], e["shape"], e["data_offsets"]) for k, e in entries.items()}
