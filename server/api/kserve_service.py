"""`inference.GRPCInferenceService`: the KServe / Open Inference Protocol v2 front, on the gRPC port.

Unmodified v2 clients (tritonclient.grpc, KServe tooling) check health and metadata, generate
text with the convention of Triton's LLM backends (kserve_generation), and manage adapter
residency through the model-repository extension (kserve_repository). A model name is an
endpoint, an adapter or the base model (model_names). Generation goes through the
loraplex.v1 Inference service itself, so validation, queue limits, cancellation and metrics
are the same on every front.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from loraplex.v1 import inference_pb2
from loraplex.v1 import kserve_v2_pb2 as pb
from loraplex.v1 import kserve_v2_pb2_grpc

from . import kserve_repository
from .admin_service import _version
from .generate_request import ApiError
from .inference_service import InferenceService
from .kserve_generation import INPUTS_METADATA, OUTPUTS_METADATA, TEXT_OUTPUT, TextGeneration, generate_request, parse
from .kserve_tensors import bytes_output
from .model_names import Model, find_model
from .server_state import ServerState

FINISH = {inference_pb2.FINISH_REASON_LENGTH: "length", inference_pb2.FINISH_REASON_STOP: "stop",
          inference_pb2.FINISH_REASON_EOS: "eos"}
EXTENSIONS = ["model_repository"]
FINAL = "triton_final_response"  # how a decoupled stream marks the last response of a request

log = logging.getLogger(__name__)

PLATFORM = "loraplex"  # ServerMetadata / ModelMetadata platform


class StreamFailed(Exception):
    """A request inside ModelStreamInfer failed; it is reported in that stream, which goes on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _StreamRequestContext:
    """The servicer context the Inference service sees for one request of a ModelStreamInfer
    stream: aborting fails that request only, everything else is the stream's own context."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "", *args: Any) -> None:
        raise StreamFailed(code, details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class KServeService(kserve_v2_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState, inference: InferenceService) -> None:
        self.state = state
        self.inference = inference

    # health and metadata ----------------------------------------------------------------
    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.state.draining)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="loraplex", version=_version(), extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        """Ready when the name resolves and the server is not draining; an unknown name is simply
        not ready (as Triton answers), so probes need no error handling."""
        try:
            await self._model(request.name, request.version)
        except ApiError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.state.draining)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        model = await self._guard(context, self._model(request.name, request.version))
        return pb.ModelMetadataResponse(name=model.name, versions=list(model.versions), platform=PLATFORM,
                                        inputs=INPUTS_METADATA, outputs=OUTPUTS_METADATA)

    # inference --------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        model, gen, call = await self._guard(context, self._prepare(request))
        if gen.stream:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "stream is true: use ModelStreamInfer (tritonclient: start_stream and "
                                "async_stream_infer) for streamed responses")
        result = await self.inference.Generate(call, context)
        text = result.text if gen.exclude_input else gen.prompt + result.text
        return _response(request, model, gen, text, result.finish_reason, result.usage)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently; each answers with its own responses, the last
        one marked triton_final_response (empty if the client asked for an empty final response).
        A failed request is reported by error_message and the stream goes on."""
        out: asyncio.Queue = asyncio.Queue()
        done = object()
        tasks: set[asyncio.Task] = set()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._stream_one(request, context, out))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:  # the client closed its side: answer what it sent, then end
                    await asyncio.wait(set(tasks))
            finally:
                out.put_nowait(done)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await out.get()
                if item is done:
                    break
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_one(self, request: pb.ModelInferRequest, context, out: asyncio.Queue) -> None:
        try:
            model, gen, call = await self._prepare(request)
            sub_context = _StreamRequestContext(context)
            if not gen.stream:
                result = await self.inference.Generate(call, sub_context)
                text = result.text if gen.exclude_input else gen.prompt + result.text
                response = _response(request, model, gen, text, result.finish_reason, result.usage)
                response.parameters[FINAL].bool_param = True
                out.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
                return
            async for event in self.inference.GenerateStream(call, sub_context):
                if event.HasField("delta"):
                    response = _response(request, model, gen, event.delta.text)
                    response.parameters[FINAL].bool_param = False
                else:  # the end: empty text_output, or no output at all when the client asked so
                    text = None if gen.empty_final else ""
                    response = _response(request, model, gen, text, event.end.finish_reason, event.end.usage)
                    response.parameters[FINAL].bool_param = True
                out.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
        except ApiError as exc:
            out.put_nowait(_stream_error(request, exc.message))
        except StreamFailed as exc:
            out.put_nowait(_stream_error(request, exc.message))
        except Exception as exc:  # a bug must not leave the client waiting for this request forever
            log.exception("stream request failed")
            out.put_nowait(_stream_error(request, f"internal error: {type(exc).__name__}: {exc}"))

    # the repository extension -----------------------------------------------------------
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        return await self._guard(context, kserve_repository.index(self.state, request))

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context
                                  ) -> pb.RepositoryModelLoadResponse:
        await self._guard(context, kserve_repository.load(self.state, request))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context
                                    ) -> pb.RepositoryModelUnloadResponse:
        await self._guard(context, kserve_repository.unload(self.state, request))
        return pb.RepositoryModelUnloadResponse()

    # helpers ----------------------------------------------------------------------------
    async def _model(self, name: str, version: str) -> Model:
        return await asyncio.to_thread(find_model, self.state.store, self.state.model_name, name, version)

    async def _prepare(self, request: pb.ModelInferRequest
                       ) -> tuple[Model, TextGeneration, inference_pb2.GenerateRequest]:
        gen = parse(request)  # malformed tensors fail before the registry is read
        model = await self._model(request.model_name, request.model_version)
        return model, gen, generate_request(gen, model)

    @staticmethod
    async def _guard(context: grpc.aio.ServicerContext, work):
        try:
            return await work
        except ApiError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)


def _response(request: pb.ModelInferRequest, model: Model, gen: TextGeneration, text: str | None,
              finish_reason: int | None = None, usage: inference_pb2.Usage | None = None) -> pb.ModelInferResponse:
    """A ModelInferResponse carrying `text` as text_output (none when `text` is None), and the
    finish reason and token counts as response parameters once the request is done."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    if text is not None:
        tensor, raw = bytes_output(TEXT_OUTPUT, [text.encode("utf-8")], gen.text_shape)
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)
    if finish_reason is not None:
        response.parameters["finish_reason"].string_param = FINISH.get(finish_reason, "")
    if usage is not None:
        response.parameters["prompt_tokens"].int64_param = usage.prompt_tokens
        response.parameters["completion_tokens"].int64_param = usage.completion_tokens
    return response


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(error_message=message,
                                       infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                                            id=request.id))
