"""Fuzzing the KServe v2 tensor decoder: `kserve_tensors.read_inputs` through
`kserve_generation.parse`, then the rest of the path `kserve_service` runs a ModelInfer on:
`model_names.find_model`, `generate_call`, `generate_request.resolve` against a real registry,
and the engine's `encode`; and `ModelInferRequest.FromString` on the wire's bytes.

The property: whatever a ModelInferRequest holds, each step accepts it or refuses it with an
`ApiError` whose status is a client's fault (encoding: `RequestError` / `ValueError`, which
`generation.generate` answers as INVALID_ARGUMENT), never another exception and never slowly
(the decoder runs on the server's event loop: a slow parse stalls every call). What `parse`
accepts has the types the rest relies on; bytes decode or raise `DecodeError` only. Requests are
valid text-generation requests (a BYTES `text_input`, scalar inputs or parameters, typed or raw)
with one aspect, or every aspect, drawn wide: datatypes known and unknown, shapes with negative,
zero, huge and very many dims, typed contents in the wrong field or of the wrong length, raw
contents of wrong lengths, BYTES elements whose length prefix lies or whose bytes are not UTF-8,
NaN and infinities, parameters of every kind, unknown inputs, outputs and model names.

This file imports loraplex.v1.kserve_v2_pb2, whose `inference.*` protobuf symbols clash with
tritonclient's in one process (test_kserve_v2 imports those), so the suite runs it in a pytest
process of its own: test_fuzz_kserve_tensors.py. Runs are fixed (derandomized, no example
database) so they cannot flake; a longer run is one command, e.g.

    LORAPLEX_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/server/api/kserve_tensors_fuzz.py
"""
from __future__ import annotations

import math
import struct
from typing import Any

from fuzzing import decoded, fuzz, refused, wire_bytes
from hypothesis import example, given
from hypothesis import strategies as st

from loraplex.adapters_store import AdapterStore
from loraplex.server.api.generate_request import ServerDefaults, resolve
from loraplex.server.api.kserve_generation import EMPTY_FINAL, SCALARS, TEXT_INPUT, TEXT_OUTPUT, generate_call, parse
from loraplex.server.api.kserve_tensors import NUMERIC
from loraplex.server.api.model_names import find_model
from loraplex.server.engine.intake import RequestError
from loraplex.v1 import kserve_v2_pb2 as pb

BASE = "tiny"  # the base model's name, as `--model` would give it
DEFAULTS = ServerDefaults()


# ---------------------------------------------------------------------------- tensors

DATATYPES = ["BYTES", *NUMERIC]
ODD_DATATYPES = ["", "FP16", "BF16", "bytes", "STRING", "fp32", "INT128"]
# each scalar input's own datatype, as tritonclient sends it
SCALAR_TYPES = {"max_tokens": "INT32", "temperature": "FP32", "top_p": "FP32", "top_k": "INT32", "seed": "UINT64",
                "ignore_eos": "BOOL", "stream": "BOOL", "exclude_input_in_output": "BOOL"}
GOOD_VALUES = {"max_tokens": st.integers(1, 64), "temperature": st.floats(0, 2, width=32),
               "top_p": st.floats(0.125, 1, width=32), "top_k": st.integers(0, 50), "seed": st.integers(0, 2**63 - 1),
               "ignore_eos": st.booleans(), "stream": st.booleans(), "exclude_input_in_output": st.booleans()}
EDGE_INTS = [-1, 0, 1, 2**31 - 1, -2**31, 2**32 - 1, 2**63 - 1, -2**63, 2**64 - 1]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 3.4028235e38, 1e308, -1.0, 2.0]
# the range each InferTensorContents field holds
FIELD_VALUES = {
    "bool_contents": st.booleans(), "int_contents": st.integers(-2**31, 2**31 - 1) | st.sampled_from(EDGE_INTS[:5]),
    "int64_contents": st.integers(-2**63, 2**63 - 1) | st.sampled_from(EDGE_INTS[:7]),
    "uint_contents": st.integers(0, 2**32 - 1), "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32) | st.sampled_from(EDGE_FLOATS[:7]),
    "fp64_contents": st.floats() | st.sampled_from(EDGE_FLOATS),
    "bytes_contents": st.binary(max_size=8) | st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc3", "é".encode()]),
}
RANGES = {"BOOL": (0, 1), "INT8": (-2**7, 2**7 - 1), "INT16": (-2**15, 2**15 - 1), "INT32": (-2**31, 2**31 - 1),
          "INT64": (-2**63, 2**63 - 1), "UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1), "UINT32": (0, 2**32 - 1),
          "UINT64": (0, 2**64 - 1)}
dims = st.sampled_from([1, 0, -1, 2, 2**31, 2**62, 2**63 - 1, -2**63]) | st.integers(-2, 3)
shapes = st.one_of(st.lists(dims, max_size=4), st.integers(1000, 20_000).map(lambda n: [2**62] * n),
                   st.integers(1000, 20_000).map(lambda n: [1] * n))
prompts = st.text(min_size=1, max_size=12).map(lambda t: t.encode("utf-8")) | st.sampled_from(
    [b"", b"\xff", b"\xed\xa0\x80", b"\xc3", b"x" * (DEFAULTS.max_prompt_chars + 1)])


def raw_element(datatype: str, value: Any) -> bytes:
    """One element as raw_input_contents writes it (little-endian; BYTES length-prefixed)."""
    if datatype == "BYTES":
        return struct.pack("<I", len(value)) + value
    code = NUMERIC[datatype][0]
    if code in "fd":
        return struct.pack("<" + code, value)
    low, high = RANGES[datatype]
    return struct.pack("<" + code, min(max(int(value), low), high))


@st.composite
def tensors(draw: st.DrawFn, name: str, datatype: str, values: list, wild: bool) -> tuple[
        pb.ModelInferRequest.InferInputTensor, bytes]:
    """The tensor (typed contents) and its raw bytes; `wild`: datatype, shape, values and their
    encoding drawn from everything the message allows."""
    shape = [len(values)]
    if wild:
        name = draw(st.sampled_from([name, name, TEXT_INPUT, "", "unknown", "TEXT_INPUT", *SCALARS])
                    | st.text(max_size=6))
        datatype = draw(st.sampled_from([datatype, datatype] + DATATYPES + ODD_DATATYPES))
        shape = draw(st.sampled_from([shape, shape, [1, 1], [1, len(values)]]) | shapes)
        if draw(st.booleans()):
            field = draw(st.sampled_from(sorted(FIELD_VALUES)))
            values = draw(st.lists(FIELD_VALUES[field], max_size=3))
    contents = pb.InferTensorContents()
    field = "bytes_contents" if datatype == "BYTES" else NUMERIC.get(datatype, ("", "fp64_contents"))[1]
    if wild and draw(st.integers(0, 3)) == 0:
        field = draw(st.sampled_from(sorted(FIELD_VALUES)))
    typed = [v for v in values if _fits(field, v)]
    getattr(contents, field).extend(typed)
    raw = b"".join(raw_element(datatype, v) for v in values if _encodable(datatype, v))
    if wild and draw(st.integers(0, 2)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw = draw(st.sampled_from([raw[:at], raw + b"\x00", raw[:at] + b"\xff\xff\xff\x7f" + raw[at:]]) |
                   st.binary(max_size=16))
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape, contents=contents), raw


def _fits(field: str, value: Any) -> bool:
    """Whether protobuf takes `value` into the repeated field `field` (its type and range)."""
    if isinstance(value, bool) != (field == "bool_contents"):
        return False  # protobuf takes a bool as an int (deprecated), and an int as a bool
    probe = pb.InferTensorContents()
    try:
        getattr(probe, field).append(value)
    except (TypeError, ValueError):
        return False
    return True


def _encodable(datatype: str, value: Any) -> bool:
    if datatype == "BYTES":
        return isinstance(value, bytes)
    if datatype not in NUMERIC:
        return False
    return isinstance(value, (bool, int, float)) and (NUMERIC[datatype][0] in "fd" or math.isfinite(value))


def parameters(wild: bool) -> st.SearchStrategy:
    """One InferParameter: of its key's kind, or of any kind, or with no value."""
    kinds = st.one_of(st.builds(pb.InferParameter, bool_param=st.booleans()),
                      st.builds(pb.InferParameter, int64_param=st.integers(-2**63, 2**63 - 1) | st.sampled_from(
                          EDGE_INTS[:7])),
                      st.builds(pb.InferParameter, uint64_param=st.sampled_from([0, 1, 2**63, 2**64 - 1])),
                      st.builds(pb.InferParameter, double_param=st.floats() | st.sampled_from(EDGE_FLOATS)),
                      st.builds(pb.InferParameter, string_param=st.text(max_size=6)), st.just(pb.InferParameter()))
    return kinds if wild else st.builds(pb.InferParameter, bool_param=st.booleans())


ASPECTS = ["text_input", "scalars", "parameters", "raw", "outputs", "model"]


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A valid text-generation request with one aspect (or every aspect) drawn wide."""
    wild = set(ASPECTS) if draw(st.integers(0, 5)) == 0 else {draw(st.sampled_from(ASPECTS))}
    prompt = draw(prompts if "text_input" in wild else st.text(min_size=1, max_size=12).map(str.encode))
    specs = [draw(tensors(TEXT_INPUT, "BYTES", [prompt], "text_input" in wild))]
    chosen = draw(st.lists(st.sampled_from(sorted(SCALARS)), max_size=3, unique=True))
    as_params = set(draw(st.lists(st.sampled_from(chosen), unique=True))) if chosen else set()
    for name in chosen:
        if name not in as_params:
            value = draw(GOOD_VALUES[name])
            specs.append(draw(tensors(name, SCALAR_TYPES[name], [value], "scalars" in wild)))
    models = st.sampled_from([BASE, "task", "sql", "soft"])
    versions = st.just("")
    if "model" in wild:  # "²" and "٣" are digits to str.isdigit
        models = st.sampled_from([BASE, "task", "sql", "soft", "nope", "", "sql@2", "task@1"]) | st.text(max_size=6)
        versions = st.sampled_from(["", "1", "2", "3", "01", "0", "-1", "²", "٣", "9" * 20]) | st.text(max_size=4)
    req = pb.ModelInferRequest(model_name=draw(models), model_version=draw(versions),
                               inputs=[spec for spec, _ in specs])
    for name in sorted(as_params):
        value = draw(GOOD_VALUES[name])
        kind = "bool_param" if isinstance(value, bool) else "int64_param" if isinstance(value, int) else "double_param"
        req.parameters[name].CopyFrom(pb.InferParameter(**{kind: value}))
    if "parameters" in wild:
        keys = st.sampled_from([*SCALARS, EMPTY_FINAL, "triton_x", "unknown", ""]) | st.text(max_size=6)
        for key, param in draw(st.dictionaries(keys, parameters(True), max_size=3)).items():
            req.parameters[key].CopyFrom(param)
    if draw(st.booleans()) or "raw" in wild:
        raws = [raw for _, raw in specs]
        if "raw" in wild:
            raws = draw(st.sampled_from([raws, raws[:-1], raws + [b""], [b"\x00" * 4] * len(raws)]))
        for spec in req.inputs:
            spec.ClearField("contents")
        req.raw_input_contents.extend(raws)
    if "outputs" in wild:
        for name in draw(st.lists(st.sampled_from([TEXT_OUTPUT, "other", ""]), max_size=2)):
            req.outputs.add(name=name)
    return req


BAD_MODEL_NAME = b"\x0a\x02\xff\xfe"  # for wire_bytes to splice in: field 1 (model_name), 2 bytes that are not UTF-8


# ---------------------------------------------------------------------------- the path


def run_request(store: AdapterStore, engine, req: pb.ModelInferRequest) -> None:
    """One ModelInfer request through the KServe front's validation path, each step accepted or
    refused."""
    no, gen = refused(lambda: parse(req))
    if no:
        return
    assert isinstance(gen.prompt, str) and isinstance(gen.prompt.encode("utf-8"), bytes)  # valid Unicode
    assert gen.text_shape in ([1], [1, 1])
    assert all(isinstance(v, bool) for v in (gen.stream, gen.exclude_input, gen.empty_final))
    targets = {target: kind for kind, target in ((s[1], s[2]) for s in SCALARS.values()) if target}
    for key, value in gen.sampling.items():
        assert isinstance(value, targets[key]) and (targets[key] is bool or not isinstance(value, bool))
    no, model = refused(lambda: find_model(store, BASE, req.model_name, req.model_version))
    if no:
        return
    no, resolved = refused(lambda: resolve(generate_call(gen, model), store, DEFAULTS))
    if no:
        return
    refused(lambda: engine.encode(resolved.request), (RequestError, ValueError))  # as generation.generate maps it


@given(infer_requests())
# Found by this test, and fixed in kserve_tensors.read_inputs: the refusal's message formatted
# math.prod(shape), an integer over 4,300 digits (ValueError); and 65,000 such dims (a 650 KB
# request) took math.prod 19 s of CPU on the event loop before the count was compared.
@example(pb.ModelInferRequest(model_name=BASE, inputs=[pb.ModelInferRequest.InferInputTensor(
    name=TEXT_INPUT, datatype="BYTES", shape=[2**62] * 1000, contents=pb.InferTensorContents(bytes_contents=[b"0"]))]))
@example(pb.ModelInferRequest(model_name=BASE, inputs=[pb.ModelInferRequest.InferInputTensor(
    name=TEXT_INPUT, datatype="BYTES", shape=[2**62] * 65_000,
    contents=pb.InferTensorContents(bytes_contents=[b"0"]))]))
@fuzz(400)
def test_fuzz_kserve_request_is_accepted_or_refused(fuzz_store, fuzz_engine, req: pb.ModelInferRequest) -> None:
    run_request(fuzz_store, fuzz_engine, req)


@given(wire_bytes(infer_requests(), BAD_MODEL_NAME))
@fuzz(300)
def test_fuzz_kserve_bytes_decode_or_raise_decode_error(fuzz_store, fuzz_engine, data: bytes) -> None:
    if (req := decoded(pb.ModelInferRequest, data)) is not None:
        run_request(fuzz_store, fuzz_engine, req)


@given(st.booleans(), st.sampled_from([BASE, "task", "sql"]))
@fuzz(10)
def test_fuzz_valid_kserve_requests_are_accepted(fuzz_store, fuzz_engine, raw: bool, model: str) -> None:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=TEXT_INPUT, datatype="BYTES", shape=[1])
    req.parameters["max_tokens"].int64_param = 8
    if raw:
        req.raw_input_contents.append(raw_element("BYTES", b"hi"))
    else:
        req.inputs[0].contents.bytes_contents.append(b"hi")
    gen = parse(req)
    assert (gen.prompt, gen.sampling) == ("hi", {"max_new_tokens": 8})
    resolved = resolve(generate_call(gen, find_model(fuzz_store, BASE, model)), fuzz_store, DEFAULTS)
    assert fuzz_engine.encode(resolved.request).prompt_token_ids
