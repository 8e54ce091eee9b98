"""`inference.GRPCInferenceService`: the KServe / Open Inference Protocol v2 front, on the gRPC port.

Unmodified v2 clients (tritonclient.grpc, KServe tooling) check health and metadata, generate
text with the convention of Triton's LLM backends (kserve_generation), and manage adapter
residency through the model-repository extension (kserve_repository). A model name is an
endpoint, an adapter or the base model (model_names). Generation is the one path every front
shares (`generation.generate` on a `GenerateCall`), so validation, queue limits, cancellation and
metrics are the same on every front.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from loraplex.v1 import kserve_v2_pb2 as pb
from loraplex.v1 import kserve_v2_pb2_grpc

from . import kserve_repository
from .generate_request import ApiError, GenerateCall
from .generation import generate
from .inference_service import call_deadline
from .kserve_generation import INPUTS_METADATA, OUTPUTS_METADATA, TEXT_OUTPUT, TextGeneration, generate_call, parse
from .kserve_tensors import bytes_output
from .model_names import Model, find_model
from .server_state import ServerState
from .status import abort, clip
from .version import server_version

EXTENSIONS = ["model_repository"]
FINAL = "triton_final_response"  # how a decoupled stream marks the last response of a request

log = logging.getLogger(__name__)

PLATFORM = "loraplex"  # ServerMetadata / ModelMetadata platform


@dataclass
class Ending:
    """How a finished request ended: its finish reason and token counts (response parameters)."""
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class KServeService(kserve_v2_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    # health and metadata ----------------------------------------------------------------
    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.state.draining)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="loraplex", version=server_version(), extensions=EXTENSIONS)

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
        model, gen, call = await self._guard(context, self._prepare(request, call_deadline(context)))
        if gen.stream:
            await abort(context, "INVALID_ARGUMENT", "stream is true: use ModelStreamInfer (tritonclient: "
                                                     "start_stream and async_stream_infer) for streamed responses")
        text, ending = await self._guard(context, self._complete(call))
        return _response(request, model, gen, text if gen.exclude_input else gen.prompt + text, ending)

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
                    task = asyncio.create_task(self._stream_one(request, out, call_deadline(context)))
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

    async def _stream_one(self, request: pb.ModelInferRequest, out: asyncio.Queue, deadline: float | None) -> None:
        """One request of a stream; its failure is reported in the stream, which goes on."""
        try:
            model, gen, call = await self._prepare(request, deadline)
            if not gen.stream:
                text, ending = await self._complete(call)
                response = _response(request, model, gen, text if gen.exclude_input else gen.prompt + text, ending)
                response.parameters[FINAL].bool_param = True
                out.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
                return
            async with aclosing(generate(self.state, call)) as outputs:
                async for _, output in outputs:
                    if output.text or output.token_ids:
                        response = _response(request, model, gen, output.text)
                        response.parameters[FINAL].bool_param = False
                        out.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
                    if output.finished:  # empty text_output, or no output at all when the client asked so
                        response = _response(request, model, gen, None if gen.empty_final else "", _ending(output))
                        response.parameters[FINAL].bool_param = True
                        out.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
        except ApiError as exc:
            out.put_nowait(_stream_error(request, exc.message))
        except Exception as exc:  # a bug must not leave the client waiting for this request forever
            log.exception("stream request failed")
            out.put_nowait(_stream_error(request, f"internal error: {type(exc).__name__}: {exc}"))

    async def _complete(self, call: GenerateCall) -> tuple[str, Ending]:
        """Run `call` to its end: the generated text and how it ended (ApiError when refused or failed)."""
        parts: list[str] = []
        async with aclosing(generate(self.state, call)) as outputs:
            async for _, output in outputs:
                parts.append(output.text)
                last = output
        return "".join(parts), _ending(last)

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

    async def _prepare(self, request: pb.ModelInferRequest, deadline: float | None
                       ) -> tuple[Model, TextGeneration, GenerateCall]:
        """The request decoded and resolved; `deadline` is the call's (see inference_service.call_deadline)."""
        gen = parse(request)  # malformed tensors fail before the registry is read
        model = await self._model(request.model_name, request.model_version)
        return model, gen, dataclasses.replace(generate_call(gen, model), deadline=deadline)

    @staticmethod
    async def _guard(context: grpc.aio.ServicerContext, work):
        try:
            return await work
        except ApiError as exc:
            await abort(context, exc.code, exc.message)


def _response(request: pb.ModelInferRequest, model: Model, gen: TextGeneration, text: str | None,
              ending: Ending | None = None) -> pb.ModelInferResponse:
    """A ModelInferResponse carrying `text` as text_output (none when `text` is None), and the
    finish reason and token counts as response parameters once the request is done."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    if text is not None:
        tensor, raw = bytes_output(TEXT_OUTPUT, [text.encode("utf-8")], gen.text_shape)
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)
    if ending is not None:
        response.parameters["finish_reason"].string_param = ending.finish_reason
        response.parameters["prompt_tokens"].int64_param = ending.prompt_tokens
        response.parameters["completion_tokens"].int64_param = ending.completion_tokens
    return response


def _ending(output) -> Ending:
    """The Ending of a request from its last engine output (one completion: KServe asks for no n)."""
    return Ending(output.finish_reason or "", output.prompt_tokens, output.completion_tokens)


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(error_message=clip(message),
                                       infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                                            id=request.id))
