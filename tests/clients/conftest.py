"""A small in-test fake loraplex server, for testing the client in isolation.

It implements the contract's methods just far enough to echo what the client sent and to
record it (requests, metadata, uploaded bytes). End-to-end tests against the real server
live elsewhere.
"""
from __future__ import annotations

import shutil
import subprocess
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest

from loraplex.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in context.invocation_metadata()}


def _served_by(request: inference_pb2.GenerateRequest) -> inference_pb2.ServedBy:
    def versioned(ref: str) -> str:
        return ref if not ref or "@" in ref else f"{ref}@1"

    adapter = "sql@2" if request.endpoint else versioned(request.adapter)
    return inference_pb2.ServedBy(endpoint=request.endpoint, adapter=adapter,
                                  soft_prompt=versioned(request.soft_prompt))


class FakeInference(inference_pb2_grpc.InferenceServicer):
    """Echoes the prompt back as " you said <prompt>"; endpoint "missing" is NOT_FOUND."""

    def __init__(self):
        self.requests: list[inference_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.deadlines: list[float] = []  # seconds each call had left on arrival (about 9e18 without a deadline)

    def _record(self, request, context) -> str:
        self.requests.append(request)
        self.metadata.append(_metadata(context))
        self.deadlines.append(context.time_remaining())
        if request.endpoint == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown endpoint 'missing'")
        prompt = request.prompt if request.HasField("prompt") else request.chat.messages[-1].content
        return f" you said {prompt}"

    def Generate(self, request, context):
        text = self._record(request, context)
        return inference_pb2.GenerateResponse(
            request_id=request.request_id or "req-1", text=text, token_ids=[ord(c) for c in text],
            finish_reason=inference_pb2.FINISH_REASON_STOP,
            usage=inference_pb2.Usage(prompt_tokens=3, completion_tokens=len(text)), served_by=_served_by(request),
        )

    def GenerateStream(self, request, context):
        text = self._record(request, context)
        common = dict(request_id=request.request_id or "req-1", served_by=_served_by(request))
        for start in range(0, len(text), 4):
            piece = text[start:start + 4]
            yield inference_pb2.GenerateStreamResponse(
                **common, delta=inference_pb2.TextDelta(text=piece, token_ids=[ord(c) for c in piece]))
        yield inference_pb2.GenerateStreamResponse(**common, end=inference_pb2.StreamEnd(
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=inference_pb2.Usage(prompt_tokens=3, completion_tokens=len(text))))


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """Keeps adapters and endpoints in dicts; UpdateEndpoint replaces the whole definition."""

    def __init__(self):
        self.metadata: list[dict[str, str]] = []
        self.uploads: list[list[admin_pb2.UploadAdapterRequest]] = []
        self.registered: list[admin_pb2.RegisterAdapterRequest] = []
        self.adapters: dict[str, admin_pb2.AdapterInfo] = {}
        self.endpoints: dict[str, admin_pb2.Endpoint] = {}
        self.endpoint_requests: list[admin_pb2.Endpoint] = []

    def _add(self, name: str, size: int) -> admin_pb2.AdapterInfo:
        info = admin_pb2.AdapterInfo(name=name, version=1, kind=admin_pb2.ADAPTER_KIND_LORA, size_bytes=size,
                                     ranks={"q_proj": 8})
        self.adapters[f"{name}@1"] = info
        return info

    def _adapter(self, ref: str, context) -> admin_pb2.AdapterInfo:
        info = self.adapters.get(ref if "@" in ref else f"{ref}@1")
        if info is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown adapter {ref!r}")
        return info

    def RegisterAdapter(self, request, context):
        self.metadata.append(_metadata(context))
        self.registered.append(request)
        return self._add(request.name, 0)

    def UploadAdapter(self, request_iterator, context):
        self.metadata.append(_metadata(context))
        messages = list(request_iterator)
        self.uploads.append(messages)
        return self._add(messages[0].name, sum(len(m.chunk.data) for m in messages[1:]))

    def GetAdapter(self, request, context):
        self.metadata.append(_metadata(context))
        return self._adapter(request.name, context)

    def ListAdapters(self, request, context):
        self.metadata.append(_metadata(context))
        return admin_pb2.ListAdaptersResponse(adapters=list(self.adapters.values()))

    def DeleteAdapter(self, request, context):
        info = self._adapter(request.name, context)
        del self.adapters[f"{info.name}@{info.version}"]
        return admin_pb2.DeleteAdapterResponse(deleted=[info])

    def PinAdapter(self, request, context):
        info = self._adapter(request.name, context)
        info.pinned = True
        return info

    def UnpinAdapter(self, request, context):
        info = self._adapter(request.name, context)
        info.pinned = False
        return info

    def _endpoint(self, name: str, context) -> admin_pb2.Endpoint:
        if name not in self.endpoints:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown endpoint {name!r}")
        return self.endpoints[name]

    def CreateEndpoint(self, request, context):
        self.metadata.append(_metadata(context))
        self.endpoint_requests.append(request)
        if request.name in self.endpoints:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"endpoint {request.name!r} exists")
        self.endpoints[request.name] = request
        return request

    def UpdateEndpoint(self, request, context):
        self.metadata.append(_metadata(context))
        self.endpoint_requests.append(request)
        self._endpoint(request.name, context)
        self.endpoints[request.name] = request
        return request

    def GetEndpoint(self, request, context):
        return self._endpoint(request.name, context)

    def ListEndpoints(self, request, context):
        return admin_pb2.ListEndpointsResponse(endpoints=list(self.endpoints.values()))

    def DeleteEndpoint(self, request, context):
        self._endpoint(request.name, context)
        del self.endpoints[request.name]
        return admin_pb2.Empty()

    def GetServerInfo(self, request, context):
        return admin_pb2.ServerInfo(model="tiny", max_loras=4, resident_adapters=list(self.adapters))


def _serve(host: str, credentials: grpc.ServerCredentials | None = None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference, admin = FakeInference(), FakeAdmin()
    inference_pb2_grpc.add_InferenceServicer_to_server(inference, server)
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    address = f"{host}:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    return server, SimpleNamespace(target=f"{host}:{port}", inference=inference, admin=admin)


@pytest.fixture
def fake_server():
    """A running fake server on 127.0.0.1: `.target`, `.inference`, `.admin`."""
    server, handle = _serve("127.0.0.1")
    yield handle
    server.stop(None)


@pytest.fixture
def tls_fake_server(tmp_path):
    """The fake server behind TLS with a throwaway self-signed certificate (`.ca` is its path)."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command (Debian's openssl, on every machine image) makes the test certificate"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, handle = _serve("127.0.0.1", credentials)
    handle.ca = str(cert)
    yield handle
    server.stop(None)


@pytest.fixture
def adapter_dir(tmp_path):
    """A flat adapter directory: three files of different sizes, one of them empty."""
    root = tmp_path / "adapter"
    root.mkdir()
    files = {
        "adapter_config.json": b'{"peft_type": "LORA", "r": 8}',
        "adapter_model.safetensors": bytes(range(256)) * 5 + b"tail",
        "README.md": b"",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return SimpleNamespace(path=root, files=files)
