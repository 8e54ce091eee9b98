"""Generated gRPC stubs of the loraplex.v1 contract (see ../../../scripts/gen_proto.py)."""
