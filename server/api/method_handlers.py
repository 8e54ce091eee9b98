"""A gRPC method handler rebuilt around another behaviour: the one step the interceptors
(`auth.py`, `wire_errors.py`) share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def same_kind(handler: grpc.RpcMethodHandler, behaviour: Callable,
              request_deserializer: Callable[[bytes], Any] | None) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s streaming kind and response serializer that runs `behaviour`."""
    make = _MAKERS[(handler.request_streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=request_deserializer, response_serializer=handler.response_serializer)
