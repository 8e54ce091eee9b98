"""Ending a gRPC call with a status: one place that bounds what a refusal echoes.

Why: a refusal often quotes what the client sent (a name, a path, a value), and gRPC carries the
message in the `grpc-message` trailer, which clients cap (8 KiB of metadata by default). A
10,000-character name echoed back overflowed it, and the client saw a transport error instead of
the refusal. Every gRPC front aborts through :func:`abort`, which cuts the message to
:data:`MAX_STATUS_CHARS` characters, saying so, whatever the caller echoed.
"""
from __future__ import annotations

from typing import NoReturn

import grpc

MAX_STATUS_CHARS = 1000


def clip(message: str, limit: int = MAX_STATUS_CHARS) -> str:
    """`message` cut to `limit` characters, marked as cut where it was."""
    if len(message) <= limit:
        return message
    marker = f"... [{len(message) - limit} more characters]"
    return message[: max(0, limit - len(marker))] + marker


async def abort(context: grpc.aio.ServicerContext, code: str, message: str) -> NoReturn:
    """End the call with the status named `code` ("INVALID_ARGUMENT", ...) and a bounded message."""
    await context.abort(getattr(grpc.StatusCode, code), clip(message))
    raise AssertionError("context.abort returned")  # it always raises; this keeps NoReturn honest
