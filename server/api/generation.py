"""One request's life on the engine, shared by every front (gRPC, OpenAI HTTP).

`generate` resolves a `GenerateCall` on the one validation path, tokenizes it off the engine's
thread, submits it (a full queue is RESOURCE_EXHAUSTED at once) and yields the engine's outputs
until the request is over. Errors are `ApiError`s the front maps to its own codes. Whatever way
it ends (finished, refused, failed, or the front stops iterating because its client went away)
the request is freed in the engine and recorded once in the metrics: a request that ends early
within `DEADLINE_SLACK_S` of its call's deadline (or after it) as `deadline_exceeded`, any other as
`cancelled`. The slack covers the client giving up on its own clock: its cancel reaches the server
before the server's copy of the deadline (on loopback about 10 ms later: the grpc-timeout header is
rounded up and read on arrival).

A request naming an adapter this replica could not register (`ServerState.unservable`, say its
blob was missing at start-up) first retries registering it (`registry_sync.retry_unservable`, at
most once per adapter every few seconds), so restoring the files makes it servable again.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from loraplex.adapters_store.errors import StoreError
from loraplex.server.engine.adapter_errors import AdapterError, AdapterQuarantined
from loraplex.server.engine.intake import RequestError
from loraplex.server.engine.sequence import RequestOutput

from .engine_loop import QueueFull
from .generate_request import ApiError, GenerateCall, Resolved, resolve
from .metrics import UNKNOWN_ENDPOINT
from .registry_sync import retry_unservable
from .server_state import ServerState

DEADLINE_SLACK_S = 0.1


async def generate(state: ServerState, call: GenerateCall) -> AsyncIterator[tuple[Resolved, RequestOutput]]:
    """Yield (what served the request, each engine output) until the request's last output."""
    arrival = time.monotonic()
    endpoint = UNKNOWN_ENDPOINT if call.endpoint else ""  # a label only once the endpoint resolves
    status, first_token, prompt_tokens = "ok", None, 0
    generated: dict[int, int] = {}  # completion index -> tokens so far
    request_id = None  # set while the engine holds the request
    try:
        if state.draining:
            raise ApiError("UNAVAILABLE", "the server is shutting down")
        try:
            resolved = resolve(call, state.store, state.defaults)
        except ApiError:
            endpoint = _known_endpoint(state, call.endpoint) or endpoint
            raise
        endpoint = resolved.endpoint
        for ref in (resolved.adapter, resolved.soft_prompt):
            if ref in state.unservable and not await retry_unservable(state, ref):
                raise ApiError("FAILED_PRECONDITION", f"{ref} is {state.not_servable(ref)}")
        loop = state.engine_loop
        try:
            engine_request = await asyncio.to_thread(loop.engine.encode, resolved.request)
        except (RequestError, ValueError) as exc:
            raise ApiError("INVALID_ARGUMENT", str(exc)) from None
        try:
            outputs = loop.submit(engine_request)
        except QueueFull as exc:
            raise ApiError("RESOURCE_EXHAUSTED", str(exc)) from None
        request_id = resolved.request.request_id
        while True:
            item = await outputs.get()
            if isinstance(item, AdapterQuarantined):  # well formed, but what it names is refused for now
                request_id = None
                raise ApiError(item.status, str(item))
            if isinstance(item, (RequestError, AdapterError)):
                request_id = None
                raise ApiError("INVALID_ARGUMENT", str(item))
            if isinstance(item, Exception):
                request_id = None
                raise ApiError("INTERNAL", f"{type(item).__name__}: {item}")
            if item.finished:
                request_id = None
            if item.error is not None:
                raise ApiError(item.error_code or "INTERNAL", item.error)
            if first_token is None and item.token_ids:
                first_token = time.monotonic()
            generated[item.index] = item.completion_tokens
            prompt_tokens = item.prompt_tokens
            yield resolved, item
            if item.finished:
                return
    except ApiError as exc:
        status = exc.code.lower()
        raise
    except asyncio.CancelledError:
        status = _ended_early(call)
        raise
    finally:
        if request_id is not None:  # client cancelled, deadline passed, or an error: free it
            state.engine_loop.abort(request_id)
            if status == "ok":
                status = _ended_early(call)
        state.metrics.record_finished(endpoint, status, arrival, first_token, time.monotonic(),
                                      prompt_tokens, sum(generated.values()))


def _ended_early(call: GenerateCall) -> str:
    """The status of a request its client stopped waiting for: its deadline's, or a cancel's."""
    if call.deadline is not None and time.monotonic() >= call.deadline - DEADLINE_SLACK_S:
        return "deadline_exceeded"
    return "cancelled"


def _known_endpoint(state: ServerState, name: str) -> str | None:
    """`name` if it is a registered endpoint (only those become metric labels)."""
    if not name:
        return None
    try:
        state.store.get_endpoint(name)
    except StoreError:
        return None
    return name


def token_text(tokenizer, token_id: int) -> str:
    """A token decoded on its own (special tokens kept, so none becomes an empty string)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)
