"""Token checks for the gRPC port: an API key for inference, an admin token for the Admin API.

Clients send `authorization: Bearer <token>` (or `x-api-key` / `x-admin-token`). Health and
reflection stay open so probes work without secrets. The KServe v2 service follows the same
rules: its repository RPCs need the admin token, the rest the API key, except the liveness and
readiness probes.
"""
from __future__ import annotations

import hmac

import grpc

from .method_handlers import same_kind
from .status import abort

INFERENCE_PREFIX = "/loraplex.v1.Inference/"
ADMIN_PREFIX = "/loraplex.v1.Admin/"
KSERVE_PREFIX = "/inference.GRPCInferenceService/"
KSERVE_ADMIN_PREFIX = KSERVE_PREFIX + "Repository"  # the model-repository extension manages adapters
KSERVE_PROBES = {KSERVE_PREFIX + "ServerLive", KSERVE_PREFIX + "ServerReady"}  # open, as health is


def read_token_file(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def _presented(metadata, header: str) -> list[str]:
    tokens = []
    for key, value in metadata or ():
        if key == "authorization" and value.lower().startswith("bearer "):
            tokens.append(value[7:].strip())
        elif key == header:
            tokens.append(value.strip())
    return tokens


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str | None, admin_token: str | None) -> None:
        # the first rule whose prefix matches applies
        self.rules = [(INFERENCE_PREFIX, "x-api-key", api_key, "an API key"),
                      (ADMIN_PREFIX, "x-admin-token", admin_token, "the admin token"),
                      (KSERVE_ADMIN_PREFIX, "x-admin-token", admin_token, "the admin token"),
                      (KSERVE_PREFIX, "x-api-key", api_key, "an API key")]

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in KSERVE_PROBES:
            return handler
        for prefix, header, secret, what in self.rules:
            if details.method.startswith(prefix):
                if secret:
                    presented = _presented(details.invocation_metadata, header)
                    if not any(hmac.compare_digest(t.encode(), secret.encode()) for t in presented):
                        return _refusal(handler, f"{details.method} needs {what} (authorization: Bearer ...)")
                break
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context):
        await abort(context, "UNAUTHENTICATED", message)

    async def deny_stream(request_or_iterator, context):
        await abort(context, "UNAUTHENTICATED", message)
        yield  # an async generator, as streaming handlers are

    return same_kind(handler, deny_stream if handler.response_streaming else deny, handler.request_deserializer)
