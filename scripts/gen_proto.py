"""Regenerate the gRPC stubs in proto/loraplex/v1 from the .proto files (never edit the stubs).

    .venv/bin/python scripts/gen_proto.py [--out DIR]

tests/proto/test_stubs.py regenerates into a temporary directory and fails when the committed
stubs differ.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted((PROTO_ROOT / "loraplex" / "v1").glob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}"]
    args += [str(p.relative_to(PROTO_ROOT)) for p in sources]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out / "loraplex" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    for path in generate(parser.parse_args().out):
        print(path)
    sys.exit(0)
