"""The OpenAI-compatible HTTP front (`loraplex serve --http-port`), on the gRPC server's event loop.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both streamed as server-sent events
when `stream` is true, ending with `data: [DONE]`), `GET /v1/models` and `GET /v1/models/{id}`.
Requests map onto the same `GenerateCall`, validation, engine queue and metrics as gRPC
(`generation.generate`); `--api-key-file` is required as `Authorization: Bearer` on every route.
Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
status a gRPC status name maps to (400, 401, 404, 429, 500, 503, ...).

A streamed request waits for its first output before answering, so anything refused up to
then (bad values, unknown adapter, full queue) still gets its own status code; a failure after
that arrives as an `error` event.

A connection gets `--http-header-timeout` seconds for each request's line and headers (408, then
closed: see `HeadDeadline`) and `--http-idle-timeout` seconds idle between requests; a body nested
deeper than `bounded_json.MAX_JSON_DEPTH` levels, or with an integer of more than
`MAX_JSON_INT_DIGITS` digits, is a 400, refused before json.loads recurses or converts it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import ssl
import time
from contextlib import aclosing

from aiohttp import web

from loraplex.server.engine.bounded_json import JSONLimitError, load_json

from .generate_request import ApiError
from .generation import generate, token_text
from .openai_models import list_models, resolve_model
from .openai_schema import Choices, OpenAIError, OpenAIRequest, parse_chat, parse_completion
from .server_state import ServerState
from .status import clip

log = logging.getLogger(__name__)

# gRPC status name -> (HTTP status, OpenAI error type)
STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "ALREADY_EXISTS": (409, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "INTERNAL": (500, "server_error"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
}
HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "INVALID_ARGUMENT",
              413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT"}
API_KEY = web.AppKey("api_key", object)
STATE = web.AppKey("state", ServerState)
STARTED = web.AppKey("started", int)
MAX_BODY = web.AppKey("max_body", int)


def error_body(exc: ApiError) -> tuple[int, dict]:
    http, kind = STATUS.get(exc.code, (500, "server_error"))
    return http, {"error": {"message": clip(exc.message), "type": kind, "param": getattr(exc, "param", None),
                            "code": exc.code.lower()}}


def error_response(exc: ApiError) -> web.Response:
    http, body = error_body(exc)
    return web.json_response(body, status=http)


@web.middleware
async def errors_and_auth(request: web.Request, handler) -> web.StreamResponse:
    """Every refusal in OpenAI's error shape; the API key checked before any route runs."""
    try:
        key = request.app[API_KEY]
        if key and not _authorized(request, key):
            raise OpenAIError("UNAUTHENTICATED", f"{request.method} {request.path} needs an API key "
                                                 "(Authorization: Bearer ...)")
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "INTERNAL")
        message = f"{exc.reason}: {request.method} {request.path}"
        if exc.status == 413:
            message = f"the request body is larger than the server's limit of {request.app[MAX_BODY]} bytes"
        response = error_response(OpenAIError(code, message))
        response.set_status(exc.status)
        return response


def _authorized(request: web.Request, key: str) -> bool:
    header = request.headers.get("Authorization", "")
    presented = [header[7:].strip()] if header.lower().startswith("bearer ") else []
    if "x-api-key" in request.headers:
        presented.append(request.headers["x-api-key"].strip())
    return any(hmac.compare_digest(t.encode(), key.encode()) for t in presented)


async def _json(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = load_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError("INVALID_ARGUMENT", f"the request body is not valid JSON: {exc}") from None
    except JSONLimitError as exc:
        raise OpenAIError("INVALID_ARGUMENT", f"the request body {exc}") from None
    if not isinstance(body, dict):
        raise OpenAIError("INVALID_ARGUMENT", "the request body must be a JSON object")
    return body


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion(await _json(request)))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat(await _json(request)))


async def _generate(request: web.Request, parsed: OpenAIRequest) -> web.StreamResponse:
    state = request.app[STATE]
    target = await asyncio.to_thread(resolve_model, state.store, state.model_name, parsed.model)
    call = dataclasses.replace(parsed.call, **target)
    tokenizer = state.engine_loop.engine.tokenizer
    choices = Choices(parsed, parsed.model, int(time.time()), lambda t: token_text(tokenizer, t))
    async with aclosing(generate(state, call)) as outputs:
        _resolved, first = await outputs.__anext__()  # refusals up to here get their own status
        if parsed.stream:
            return await _stream(request, choices, first, outputs)
        out = first
        choices.add(out)
        while not out.finished:
            _resolved, out = await outputs.__anext__()
            choices.add(out)
    return web.json_response(choices.response())


async def _stream(request: web.Request, choices: Choices, first, outputs) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(data: dict | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        await response.write(f"data: {text}\n\n".encode())

    started: set[int] = set()
    out = first
    try:
        while True:
            before = choices.by_index[out.index].text if out.index in choices.by_index else ""
            choices.add(out)
            if out.text or out.token_ids or out.finish_reason or out.index not in started:
                await send(choices.chunk(out, len(before), out.index not in started))
                started.add(out.index)
            if out.finished:
                break
            _resolved, out = await outputs.__anext__()
        if choices.request.include_usage:
            await send(choices.usage_chunk())
    except ApiError as exc:
        await send(error_body(exc)[1])
    await send("[DONE]")
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    listed = await asyncio.to_thread(list_models, state.store, state.model_name, request.app[STARTED])
    return web.json_response({"object": "list", "data": listed})


async def model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model"]
    listed = await asyncio.to_thread(list_models, state.store, state.model_name, request.app[STARTED])
    for entry in listed:
        if entry["id"] == name:
            return web.json_response(entry)
    raise OpenAIError("NOT_FOUND", f"The model '{name}' does not exist (GET /v1/models lists them)", "model")


def build_app(state: ServerState, api_key: str | None, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=max_body_bytes)
    app[STATE] = state
    app[API_KEY] = api_key
    app[STARTED] = int(time.time())
    app[MAX_BODY] = max_body_bytes
    app.add_routes([web.post("/v1/completions", completions), web.post("/v1/chat/completions", chat_completions),
                    web.get("/v1/models", models), web.get("/v1/models/{model:.+}", model)])
    return app


@dataclasses.dataclass(frozen=True)
class HttpTimeouts:
    """How long a connection may take to send a request's line and headers (`--http-header-timeout`)
    and how long it may sit idle between requests (`--http-idle-timeout`), in seconds."""

    header: float = 10.0
    idle: float = 75.0

    def __post_init__(self) -> None:
        for flag, value in (("--http-header-timeout", self.header), ("--http-idle-timeout", self.idle)):
            if not value > 0:
                raise ValueError(f"{flag} must be a positive number of seconds, not {value}")


class HeadDeadline(web.RequestHandler):
    """aiohttp's connection protocol with a deadline on each request's head.

    aiohttp 3.14 has `keepalive_timeout` (armed at connect and after each response; it closes a
    connection still waiting for a complete request then) but no deadline for the request line
    and headers: a client sending a header byte a minute held its connection for the keep-alive
    time, 3630 s by default. Here the first request's head must be complete within `header`
    seconds of the connection (the TLS handshake included), and a later one's within `header`
    seconds of its first byte; a head left incomplete is answered 408 and the connection closed.
    Only the head counts: once it is parsed, a slow body upload or a long stream runs unbounded
    (the body is bounded by size, `--max-message-bytes`)."""

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self.header_timeout = header_timeout
        self.answered = 0  # responses finished; a head is awaited while every parsed request is answered
        self.head_begun = False  # bytes of the awaited head have arrived
        self.head_timer: asyncio.TimerHandle | None = None

    def awaiting_head(self) -> bool:
        return self._request_count == self.answered  # aiohttp counts each request once its head is parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.arm()

    def data_received(self, data: bytes) -> None:
        if data and self.awaiting_head():
            self.head_begun = True
            self.arm()
        super().data_received(data)
        if not self.awaiting_head():
            self.disarm()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self.answered += 1
            self.head_begun = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.disarm()
        super().connection_lost(exc)

    def arm(self) -> None:
        if self.head_timer is None:
            self.head_timer = asyncio.get_running_loop().call_later(self.header_timeout, self.head_timed_out)

    def disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if not self.awaiting_head() or self.transport is None:
            return
        if self.head_begun:  # a silent connection is just closed, as an idle one is
            self.transport.write(_request_timeout(self.header_timeout))
        self.force_close()


def _request_timeout(seconds: float) -> bytes:
    """A whole 408 response in OpenAI's error shape, written straight to the transport."""
    body = json.dumps({"error": {
        "message": f"the request line and headers did not arrive within {seconds:g} seconds "
                   "(the server's --http-header-timeout)",
        "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class HeadDeadlineSite(web.BaseSite):
    """A TCP site whose connections are `HeadDeadline` protocols (aiohttp offers no setting for the
    protocol class: `TCPSite` always makes the runner's own `RequestHandler`)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 timeouts: HttpTimeouts) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.app_runner, self.host, self.port, self.timeouts = runner, host, port, timeouts

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self.host}:{self.port}"

    def protocol(self) -> HeadDeadline:
        return HeadDeadline(self.app_runner.server, loop=asyncio.get_running_loop(),
                            header_timeout=self.timeouts.header, keepalive_timeout=self.timeouts.idle, access_log=None)

    async def start(self) -> None:
        await super().start()  # registers the site with its runner, which stops it at cleanup
        handshake = {"ssl_handshake_timeout": self.timeouts.header} if self._ssl_context else {}
        self._server = await asyncio.get_running_loop().create_server(
            self.protocol, self.host, self.port, ssl=self._ssl_context, backlog=self._backlog, **handshake)


async def start(app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None,
                timeouts: HttpTimeouts = HttpTimeouts()) -> tuple[web.AppRunner, int]:
    """Serve `app` on the running loop; returns the runner (for cleanup) and the bound port (0 picks one).
    A client that disconnects cancels its handler, which frees its request in the engine."""
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        await HeadDeadlineSite(runner, host, port, ssl_context, timeouts).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[-1][1]


def tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """The gRPC port's certificate for HTTPS too, with client certificates required when given a CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
