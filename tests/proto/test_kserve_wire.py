"""proto/loraplex/v1/kserve_v2.proto is wire-compatible with the KServe v2 protocol as tritonclient
speaks it: same package, service and method names, and every message field by number, name,
type and label. Our .proto is compiled to a descriptor set here (not imported: its `inference.*`
symbols would clash with tritonclient's in the default descriptor pool)."""
from __future__ import annotations

from importlib.metadata import requires, version
from pathlib import Path

from google.protobuf import descriptor_pb2
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"


def _ours(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    out = tmp_path / "kserve.pb"
    assert protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--descriptor_set_out={out}",
                        "loraplex/v1/kserve_v2.proto"]) == 0
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return file


def _theirs() -> descriptor_pb2.FileDescriptorProto:
    from tritonclient.grpc import service_pb2

    file = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(file)
    return file


def _fields(message: descriptor_pb2.DescriptorProto, prefix: str = "") -> dict:
    """Every field of a message and its nested messages, keyed by (message path, number)."""
    fields = {(prefix + message.name, f.number): (f.name, f.type, f.label, f.type_name) for f in message.field}
    for nested in message.nested_type:
        fields.update(_fields(nested, prefix + message.name + "."))
    return fields


def test_service_and_methods_match_the_protocol(tmp_path):
    ours, theirs = _ours(tmp_path), _theirs()
    assert ours.package == theirs.package == "inference"
    (service,) = ours.service
    (reference,) = [s for s in theirs.service if s.name == service.name == "GRPCInferenceService"]
    methods = {m.name: m for m in reference.method}
    for method in service.method:
        ref = methods[method.name]
        assert (method.input_type, method.output_type, method.client_streaming, method.server_streaming) == \
               (ref.input_type, ref.output_type, ref.client_streaming, ref.server_streaming), method.name
    assert {m.name for m in service.method} >= {"ServerLive", "ServerReady", "ServerMetadata", "ModelReady",
                                                 "ModelMetadata", "ModelInfer", "ModelStreamInfer",
                                                 "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}


def test_every_message_matches_field_for_field(tmp_path):
    ours, theirs = _ours(tmp_path), _theirs()
    reference = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        assert message.name in reference, f"{message.name} is not a message of the protocol"
        assert _fields(message) == _fields(reference[message.name]), message.name


def test_one_protobuf_runtime_serves_our_stubs_and_tritonclient():
    """The pin chosen in pyproject.toml: tritonclient's protobuf range admits the installed runtime,
    which is the major version our committed stubs were generated for."""
    installed = version("protobuf")
    wanted = [Requirement(r) for r in requires("tritonclient") or []]
    ranges = [r.specifier for r in wanted if r.name == "protobuf"]
    assert ranges and all(installed in spec for spec in ranges), (installed, ranges)
    for stub in (REPO / "proto" / "loraplex" / "v1").glob("*_pb2.py"):
        stamp = next(line for line in stub.read_text().splitlines() if line.startswith("# Protobuf Python Version:"))
        assert stamp.split(":")[1].strip().split(".")[0] == installed.split(".")[0], stub.name
