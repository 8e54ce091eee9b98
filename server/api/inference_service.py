"""The `loraplex.v1.Inference` gRPC service: Generate and GenerateStream."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from loraplex.adapters_store.errors import StoreError
from loraplex.server.engine.adapters import AdapterError
from loraplex.server.engine.engine import RequestError
from loraplex.server.engine.sequence import RequestOutput
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc

from .engine_loop import EngineLoop, QueueFull
from .generate_request import ApiError, GenerateCall, Resolved, resolve
from .metrics import UNKNOWN_ENDPOINT
from .server_state import ServerState

FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS}
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")


def call_from_proto(req: pb.GenerateRequest) -> GenerateCall:
    sampling = {f: getattr(req.sampling, f) for f in SAMPLING_FIELDS if req.sampling.HasField(f)}
    if req.sampling.stop:
        sampling["stop"] = list(req.sampling.stop)
    which = req.WhichOneof("input")
    return GenerateCall(
        endpoint=req.endpoint, adapter=req.adapter, soft_prompt=req.soft_prompt,
        prompt=req.prompt if which == "prompt" else None,
        messages=[{"role": m.role, "content": m.content} for m in req.chat.messages] if which == "chat" else None,
        sampling=sampling, request_id=req.request_id,
    )


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        text: list[str] = []
        ids: list[int] = []
        last = None
        resolved = None
        async for resolved, out in self._run(request, context):
            text.append(out.text)
            ids += out.token_ids
            last = out
        return pb.GenerateResponse(
            request_id=last.request_id, text="".join(text), token_ids=ids, finish_reason=FINISH[last.finish_reason],
            usage=pb.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
            served_by=_served_by(resolved),
        )

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for resolved, out in self._run(request, context):
            served = _served_by(resolved)
            if out.text or out.token_ids:
                yield pb.GenerateStreamResponse(request_id=out.request_id, served_by=served,
                                                delta=pb.TextDelta(text=out.text, token_ids=out.token_ids))
            if out.finished:
                yield pb.GenerateStreamResponse(
                    request_id=out.request_id, served_by=served,
                    end=pb.StreamEnd(finish_reason=FINISH[out.finish_reason],
                                     usage=pb.Usage(prompt_tokens=out.prompt_tokens,
                                                    completion_tokens=out.completion_tokens)))

    def _known_endpoint(self, name: str) -> str | None:
        """`name` if it is a registered endpoint (only those become metric labels)."""
        if not name:
            return None
        try:
            self.state.store.get_endpoint(name)
        except StoreError:
            return None
        return name

    async def _run(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[tuple[Resolved, RequestOutput]]:
        """Resolve, submit and relay one request's outputs; every exit path records metrics and
        frees the request in the engine when the client goes away."""
        state = self.state
        arrival = time.monotonic()
        endpoint = UNKNOWN_ENDPOINT if request.endpoint else ""  # a label only once the endpoint resolves
        status, first_token, prompt_tokens, generated = "ok", None, 0, 0
        request_id = None  # set while the engine holds the request
        try:
            if state.draining:
                raise ApiError("UNAVAILABLE", "the server is shutting down")
            try:
                resolved = resolve(call_from_proto(request), state.store, state.defaults)
            except ApiError:
                endpoint = self._known_endpoint(request.endpoint) or endpoint
                raise
            endpoint = resolved.endpoint
            loop: EngineLoop = state.engine_loop
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
                yield resolved, item
                if item.finished:
                    prompt_tokens, generated = item.prompt_tokens, item.completion_tokens
                    return
        except ApiError as exc:
            status = exc.code.lower()
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            if request_id is not None:  # client cancelled, deadline passed, or an error: free it
                state.engine_loop.abort(request_id)
                if status == "ok":
                    status = "cancelled"
            state.metrics.record_finished(endpoint, status, arrival, first_token, time.monotonic(),
                                          prompt_tokens, generated)


def _served_by(resolved: Resolved | None) -> pb.ServedBy:
    if resolved is None:
        return pb.ServedBy()
    return pb.ServedBy(endpoint=resolved.endpoint, adapter=resolved.adapter, soft_prompt=resolved.soft_prompt)
