"""Bytes that are no request, sent to a real server: every gRPC method answers INVALID_ARGUMENT naming
the message type and what is wrong, a client stream is refused at its first bad message, and the
server keeps serving everyone else the same tokens as before. A registry whose SQLite pages are
damaged stops `loraplex serve` with one `error:` line and exit 2.

Requests are sent with an identity serializer (`request_serializer=None`), so the bytes reach the
server exactly as written here: not wire format, or a proto3 string field holding invalid UTF-8
(protobuf raises DecodeError for both). Before server/api/wire_errors.py they ended with UNKNOWN
"Unexpected <class 'google.protobuf.message.DecodeError'>" and a traceback in the server's log.
"""
from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from loraplex.clients.client import Client
from loraplex.v1 import admin_pb2, inference_pb2
# KServe's messages and service as tritonclient defines them: the same `inference.*` package and
# wire format as loraplex.v1.kserve_v2_pb2, which a test process must never import beside
# tritonclient (both register `inference.*` in protobuf's default pool; see test_kserve_wire.py)
from tritonclient.grpc import service_pb2 as kserve_pb2

REPO = Path(__file__).resolve().parents[3]
NOT_WIRE_FORMAT = b"\xff\xff\xff"  # a field tag whose varint never ends
BAD_UTF8 = b"\xc3\x28"  # a UTF-8 lead byte followed by no continuation byte
SERVICES = [inference_pb2.DESCRIPTOR.services_by_name["Inference"],
            admin_pb2.DESCRIPTOR.services_by_name["Admin"],
            kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
# tritonclient's service has methods loraplex does not serve (TraceSetting, LogSettings, ...): keep
# the ones our kserve_v2.proto declares, read from its text
KSERVE_RPCS = set(re.findall(r"^\s*rpc\s+(\w+)", (REPO / "proto/loraplex/v1/kserve_v2.proto").read_text(), re.MULTILINE))
METHODS = [method for service in SERVICES for method in service.methods
           if service.name != "GRPCInferenceService" or method.name in KSERVE_RPCS]
PROBE = inference_pb2.GenerateRequest(prompt="the quick brown fox", sampling=inference_pb2.SamplingParameters(
    max_new_tokens=8, temperature=0.0, ignore_eos=True))


def string_field(number: int, value: bytes) -> bytes:
    """A length-delimited field `number` holding `value`, as protobuf writes a string field."""
    return bytes([number << 3 | 2, len(value)]) + value


@pytest.fixture(scope="module")
def server(module_server_factory, tiny_adapters):
    srv = module_server_factory(name="malformed")
    with Client(srv.target, timeout=60) as client:
        client.upload_adapter("good", tiny_adapters["attn4"])
    return srv


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def before(channel) -> bytes:
    """The probe's answer before any bad bytes were sent."""
    return generate(channel, PROBE.SerializeToString()).token_ids


def generate(channel: grpc.Channel, raw: bytes) -> inference_pb2.GenerateResponse:
    call = channel.unary_unary("/loraplex.v1.Inference/Generate", request_serializer=None,
                               response_deserializer=inference_pb2.GenerateResponse.FromString)
    return call(raw, timeout=60)


def refusal(channel: grpc.Channel, path: str, messages: list[bytes], client_streams: bool,
            server_streams: bool) -> grpc.RpcError:
    """The error that sending `messages` raw to `path` ends with (one message unless the client streams)."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[(client_streams, server_streams)]
    call = kind(path, request_serializer=None, response_deserializer=None)
    request = iter(messages) if client_streams else messages[0]
    with pytest.raises(grpc.RpcError) as raised:
        result = call(request, timeout=30)
        if server_streams:
            list(result)
    return raised.value


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_every_method_refuses_bytes_that_are_not_wire_format(channel, before, method):
    error = refusal(channel, f"/{method.containing_service.full_name}/{method.name}", [NOT_WIRE_FORMAT],
                    method.client_streaming, method.server_streaming)
    where = "message 1 of the request stream" if method.client_streaming else "the request"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details() == (f"{where} is not a valid {method.input_type.full_name}: its bytes are not protobuf "
                               "wire format (truncated, or not a serialized message); serialize requests with the "
                               "generated stubs")


@pytest.mark.parametrize("path, raw, fragment", [
    ("/loraplex.v1.Inference/Generate", string_field(4, BAD_UTF8),
     "the request is not a valid loraplex.v1.GenerateRequest: field 'prompt' (string, number 4) is not valid UTF-8"),
    ("/loraplex.v1.Inference/Generate", string_field(5, string_field(1, string_field(2, BAD_UTF8))),
     "not a valid loraplex.v1.GenerateRequest: field 'chat.messages.content' (string, number 2) is not valid UTF-8"),
    ("/loraplex.v1.Inference/Generate", string_field(6, NOT_WIRE_FORMAT),
     "not a valid loraplex.v1.GenerateRequest: field 'sampling' (loraplex.v1.SamplingParameters) is not protobuf "
     "wire format"),
    ("/loraplex.v1.Admin/GetAdapter", string_field(1, b"good" + BAD_UTF8),
     "the request is not a valid loraplex.v1.AdapterRef: field 'name' (string, number 1) is not valid UTF-8, which "
     "proto3 strings must be"),
    ("/inference.GRPCInferenceService/ModelInfer", string_field(1, BAD_UTF8),
     "the request is not a valid inference.ModelInferRequest: field 'model_name' (string, number 1) is not valid"),
])
def test_invalid_utf8_is_refused_naming_the_field(channel, before, path, raw, fragment):
    error = refusal(channel, path, [raw], False, False)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.details(), error.details()


@pytest.mark.parametrize("position", [1, 2])
def test_an_upload_stream_is_refused_at_its_first_bad_message(server, channel, before, position):
    good = [admin_pb2.UploadAdapterRequest(name="late").SerializeToString(),
            admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(path="adapter_config.json", data=b"{}"))
            .SerializeToString()]
    messages = good[: position - 1] + [string_field(1, BAD_UTF8)] + good
    error = refusal(channel, "/loraplex.v1.Admin/UploadAdapter", messages, True, False)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"message {position} of the request stream is not a valid "
                                      "loraplex.v1.UploadAdapterRequest: field "), error.details()
    with Client(server.target, timeout=60) as client:
        assert "late" not in {a["name"] for a in client.list_adapters()}
    assert not [p for p in (server.store / "staging").iterdir()]


@pytest.mark.parametrize("goods", [1, 2, 5, 20, 50])
def test_a_kserve_stream_is_refused_at_its_bad_message(channel, before, goods):
    """The requests before it are answered on the stream while the bad one is read: the refusal
    must not collide with those writes (an abort from the stream's reader task once did)."""
    good = kserve_pb2.ModelInferRequest(model_name="good").SerializeToString()
    error = refusal(channel, "/inference.GRPCInferenceService/ModelStreamInfer", [good] * goods + [NOT_WIRE_FORMAT],
                    True, True)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"message {goods + 1} of the request stream is not a valid "
                                      "inference.ModelInferRequest: its bytes are not protobuf wire format"), \
        error.details()


def test_the_server_keeps_serving_the_same_tokens(server, channel, before):
    for raw in (NOT_WIRE_FORMAT, string_field(4, BAD_UTF8)):
        with pytest.raises(grpc.RpcError):
            generate(channel, raw)
    assert generate(channel, PROBE.SerializeToString()).token_ids == before
    with grpc.insecure_channel(server.target) as fresh:
        assert generate(fresh, PROBE.SerializeToString()).token_ids == before
    assert "DecodeError" not in server.output() and "Traceback" not in server.output()


def test_an_unauthenticated_call_is_refused_as_such_whatever_it_sent(server_factory, tmp_path):
    """Authentication comes first: bad bytes without the key are UNAUTHENTICATED, with it INVALID_ARGUMENT."""
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    srv = server_factory("--api-key-file", str(key), name="locked")
    with grpc.insecure_channel(srv.target) as channel:
        call = channel.unary_unary("/loraplex.v1.Inference/Generate", request_serializer=None)
        with pytest.raises(grpc.RpcError) as anonymous:
            call(NOT_WIRE_FORMAT, timeout=30)
        with pytest.raises(grpc.RpcError) as keyed:
            call(NOT_WIRE_FORMAT, timeout=30, metadata=[("authorization", "Bearer s3cret")])
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert keyed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ----------------------------------------------------------------------------- a damaged registry


def _damage_table(database: Path, table: str) -> None:
    """Overwrite the root page of `table` with garbage: the header and the schema stay readable,
    so the file opens and migrates, and the first query of that table fails with
    sqlite3.DatabaseError "database disk image is malformed"."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    conn.close()
    with open(database, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(bytes((i * 37 + 11) % 256 for i in range(page_size)))


def test_serve_on_a_registry_with_damaged_pages_exits_2_with_one_error_line(tmp_path, tiny_model, tiny_adapters):
    """FAILS today (store side, for the lead): AdapterStore's start-up recovery
    (adapters_store/store.py `_recover`, `tx.list_adapters()` through sqlite_metadata.py
    `SqliteTx._exec`) lets sqlite3.DatabaseError out, and `loraplex serve` ends with a traceback
    and exit 1."""
    import transformers

    from loraplex.adapters_store import AdapterStore
    from loraplex.server.engine.adapter_format import BaseModelShape
    from loraplex.server.engine.adapters import inspect_adapter

    shape = BaseModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(tiny_model))
    root = tmp_path / "store"
    with AdapterStore(root) as store:
        for name in ("a", "b", "c"):
            store.publish_dir(name, tiny_adapters["attn4"], lambda d: inspect_adapter(d, shape, max_rank=64))
    database = root / "registry.sqlite3"
    _damage_table(database, "adapters")
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
            conn.execute("SELECT * FROM adapters").fetchall()
    done = subprocess.run([sys.executable, "-m", "loraplex.clients.cli", "serve", "--model", str(tiny_model),
                           "--store", str(root), "--port", "0", "--metrics-port", "0"],
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    assert "registry.sqlite3" in errors[0] and "malformed" in errors[0], errors[0]
