"""The committed gRPC stubs are exactly what protoc generates from the .proto files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_the_stubs_changes_nothing(tmp_path):
    generated = _generator().generate(tmp_path)
    assert generated, "protoc produced nothing"
    committed = REPO / "proto" / "loraplex" / "v1"
    names = sorted(p.name for p in generated)
    assert names == sorted(p.name for p in committed.glob("*_pb2*.py*"))
    for path in generated:
        assert path.read_text() == (committed / path.name).read_text(), f"{path.name} is stale: run scripts/gen_proto.py"


def test_the_installed_package_serves_the_committed_stubs():
    import loraplex.v1.inference_pb2 as inference

    assert Path(inference.__file__).resolve().parent == REPO / "proto" / "loraplex" / "v1"
    assert inference.DESCRIPTOR.package == "loraplex.v1"
