"""Requests whose bytes do not decode are refused with INVALID_ARGUMENT, naming what is wrong.

Why: grpc.aio deserializes a request before any servicer code runs, and a `DecodeError` from
protobuf (bytes that are not wire format, or a proto3 string field holding invalid UTF-8) ended
the call with UNKNOWN "Unexpected <class 'DecodeError'>" and a traceback in the server's log:
a client bug reported as a server fault. :class:`UndecodableRequests` wraps every method's
request deserializer so a failure yields an :class:`Undecodable` in place of the message, and
the method's behaviour so such a request (or such a message of a client stream, where it comes
up as the servicer reads it) ends the call with INVALID_ARGUMENT: "the request is not a valid
loraplex.v1.GenerateRequest: field 'prompt' is not valid UTF-8 ...". Nothing else changes: the
connection, the other calls on it and the server go on.

It applies to every service on the port (loraplex.v1, KServe v2, health, reflection), whose
handlers are all async; a synchronous handler would be left as grpc serves it. A streaming
servicer must read its requests by iterating them (all ours do): a `context.read()` would see
the :class:`Undecodable` itself. It sits after the AuthInterceptor, so an unauthenticated call is
refused as such whatever bytes it sent.
"""
from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import empty_pb2, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from .method_handlers import same_kind
from .status import abort

MAX_DIAGNOSED_DEPTH = 32  # nested messages looked into when naming the field that does not decode


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer gives in place of a request that does not decode."""

    type_name: str  # the message type expected, "loraplex.v1.GenerateRequest"
    reason: str  # what is wrong with the bytes

    def message(self, position: int | None = None) -> str:
        what = "the request" if position is None else f"message {position} of the request stream"
        return f"{what} is not a valid {self.type_name}: {self.reason}"


class UndecodableRequests(grpc.aio.ServerInterceptor):
    """Every method's handler, rebuilt to refuse undecodable requests with INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or not _is_async(handler):
            return handler
        return _rebuilt(handler)


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable:
    return next(b for b in (handler.unary_unary, handler.unary_stream, handler.stream_unary, handler.stream_stream)
                if b is not None)


def _is_async(handler: grpc.RpcMethodHandler) -> bool:
    behaviour = _behaviour(handler)
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


def _rebuilt(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    screen = _screen_stream if handler.request_streaming else _screen_request
    return same_kind(handler, _guarded(_behaviour(handler), screen), _tolerant(handler.request_deserializer))


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserialize`, giving an :class:`Undecodable` where it raises DecodeError."""
    message_class = getattr(deserialize, "__self__", None)  # the stubs pass `SomeMessage.FromString`
    descriptor = getattr(message_class, "DESCRIPTOR", None)

    def tolerant(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            if not isinstance(descriptor, Descriptor):
                return Undecodable("request message", str(exc))
            return Undecodable(descriptor.full_name, diagnose(descriptor, raw) or str(exc))

    return tolerant


class UndecodableRequest(Exception):
    """Raised where the servicer meets an :class:`Undecodable`; the method's wrapper catches it and
    aborts. Not an abort where it is met: a servicer may read its stream on a task of its own
    (ModelStreamInfer does), and an abort there, while the handler writes a response, failed in
    grpc core (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS) and left the client waiting."""


def _guarded(behaviour: Callable, screen: Callable) -> Callable:
    """`behaviour` (a coroutine or async generator function), handed its request through `screen`,
    the call ended with INVALID_ARGUMENT where that meets an undecodable message."""
    if inspect.isasyncgenfunction(behaviour):
        async def streamed(request_or_iterator, context):
            try:
                async with aclosing(behaviour(screen(request_or_iterator), context)) as responses:
                    async for response in responses:  # closed at once when the client goes: its cleanup runs now
                        yield response
            except UndecodableRequest as exc:
                await abort(context, "INVALID_ARGUMENT", str(exc))
        return streamed

    async def unary(request_or_iterator, context):
        try:
            return await behaviour(screen(request_or_iterator), context)
        except UndecodableRequest as exc:
            await abort(context, "INVALID_ARGUMENT", str(exc))
    return unary


def _screen_request(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise UndecodableRequest(request.message())
    return request


async def _screen_stream(requests: AsyncIterator) -> AsyncIterator:
    """The client's messages, up to the first that does not decode."""
    position = 0
    async for request in requests:
        position += 1
        if isinstance(request, Undecodable):
            raise UndecodableRequest(request.message(position))
        yield request


def diagnose(descriptor: Descriptor, raw: bytes, where: str = "its bytes are", path: str = "",
             depth: int = 0) -> str | None:
    """Why `raw` is no `descriptor` message, in the client's terms, or None when it cannot tell.

    `raw` is first read as a message with no known fields (only the wire format is checked);
    then each field it holds is matched with `descriptor`: a string field must be UTF-8, a
    message field must itself decode."""
    fields = _wire_fields(raw)
    if fields is None:
        return (f"{where} not protobuf wire format (truncated, or not a serialized message); "
                "serialize requests with the generated stubs")
    if depth >= MAX_DIAGNOSED_DEPTH:
        return None
    for number, value in fields:
        field = descriptor.fields_by_number.get(number)
        if field is None or not isinstance(value, bytes):
            continue
        name = f"{path}{field.name}"
        if field.type == FieldDescriptor.TYPE_STRING and not _is_utf8(value):
            return f"field '{name}' (string, number {number}) is not valid UTF-8, which proto3 strings must be"
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            inner = f"field '{name}' ({field.message_type.full_name}) is"
            found = diagnose(field.message_type, value, inner, f"{name}.", depth + 1)
            if found is not None:
                return found
    return None


def _wire_fields(raw: bytes) -> list[tuple[int, Any]] | None:
    """(field number, value) of each field in `raw` (length-delimited values as bytes), or None
    where `raw` is not wire format at all."""
    holder = empty_pb2.Empty()
    try:
        holder.ParseFromString(raw)
    except DecodeError:
        return None
    return [(field.field_number, field.data) for field in unknown_fields.UnknownFieldSet(holder)]


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
