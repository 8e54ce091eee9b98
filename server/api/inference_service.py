"""The `loraplex.v1.Inference` gRPC service: Generate, GenerateStream and Score."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from loraplex.server.engine.sampler import TokenLogprob
from loraplex.server.engine.sequence import RequestOutput
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc

from .generate_request import ApiError, GenerateCall, Resolved
from .generation import generate, token_text
from .server_state import ServerState
from .status import abort

FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS}
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "n", "logprobs",
                   "top_logprobs")


def call_from_proto(req: pb.GenerateRequest, deadline: float | None = None) -> GenerateCall:
    """The front-neutral call; `deadline` in time.monotonic() terms (see `call_deadline`)."""
    sampling = {f: getattr(req.sampling, f) for f in SAMPLING_FIELDS if req.sampling.HasField(f)}
    if req.sampling.stop:
        sampling["stop"] = list(req.sampling.stop)
    return GenerateCall(**_target_and_input(req), sampling=sampling, request_id=req.request_id, deadline=deadline)


def _target_and_input(req: pb.GenerateRequest | pb.ScoreRequest) -> dict:
    """The fields GenerateRequest and ScoreRequest share: what to apply, and the prompt or chat."""
    which = req.WhichOneof("input")
    return {"endpoint": req.endpoint, "adapter": req.adapter, "soft_prompt": req.soft_prompt,
            "prompt": req.prompt if which == "prompt" else None,
            "messages": [{"role": m.role, "content": m.content} for m in req.chat.messages] if which == "chat"
            else None}


def score_call_from_proto(req: pb.ScoreRequest, deadline: float | None = None) -> GenerateCall:
    """A Score request as a call that scores `continuation` after the prompt or chat."""
    top = req.top_logprobs
    return GenerateCall(**_target_and_input(req), sampling={"logprobs": True, "top_logprobs": top} if top else {},
                        request_id=req.request_id, deadline=deadline, continuation=req.continuation)


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as a time.monotonic() value; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        choices: dict[int, pb.Choice] = {}
        last = resolved = None
        prompt_tokens = 0
        async for resolved, out in self._run(request, context):
            choice = choices.setdefault(out.index, pb.Choice(index=out.index))
            choice.text += out.text
            choice.token_ids.extend(out.token_ids)
            choice.logprobs.extend(self._logprobs(out.logprobs))
            choice.completion_tokens = out.completion_tokens
            if out.finish_reason is not None:
                choice.finish_reason = FINISH[out.finish_reason]
            prompt_tokens = out.prompt_tokens
            last = out
        ordered = [choices[i] for i in sorted(choices)]
        first = ordered[0]
        return pb.GenerateResponse(
            request_id=last.request_id, text=first.text, token_ids=first.token_ids,
            finish_reason=first.finish_reason, logprobs=first.logprobs,
            usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(c.completion_tokens for c in ordered)),
            served_by=_served_by(resolved), choices=ordered if len(ordered) > 1 else [],
        )

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        reasons: dict[int, int] = {}
        tokens: dict[int, int] = {}
        async for resolved, out in self._run(request, context):
            served = _served_by(resolved)
            tokens[out.index] = out.completion_tokens
            if out.finish_reason is not None:
                reasons[out.index] = FINISH[out.finish_reason]
            if out.text or out.token_ids:
                yield pb.GenerateStreamResponse(
                    request_id=out.request_id, served_by=served,
                    delta=pb.TextDelta(text=out.text, token_ids=out.token_ids, index=out.index,
                                       logprobs=self._logprobs(out.logprobs)))
            if out.finished:
                ordered = [reasons[i] for i in sorted(reasons)]
                yield pb.GenerateStreamResponse(
                    request_id=out.request_id, served_by=served,
                    end=pb.StreamEnd(finish_reason=ordered[0],
                                     usage=pb.Usage(prompt_tokens=out.prompt_tokens,
                                                    completion_tokens=sum(tokens.values())),
                                     finish_reasons=ordered if len(ordered) > 1 else []))

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        tokens: list[TokenLogprob] = []
        last = resolved = None
        async for resolved, out in self._run(score_call_from_proto(request, call_deadline(context)), context):
            tokens += out.prompt_logprobs
            last = out
        return pb.ScoreResponse(request_id=last.request_id, tokens=self._logprobs(tokens),
                                total_logprob=sum(lp.logprob for lp in tokens),
                                usage=pb.Usage(prompt_tokens=last.prompt_tokens), served_by=_served_by(resolved))

    async def _run(self, request: pb.GenerateRequest | GenerateCall, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[tuple[Resolved, RequestOutput]]:
        """The request's outputs; a refusal or failure aborts the call with its status code."""
        call = request if isinstance(request, GenerateCall) else call_from_proto(request, call_deadline(context))
        try:
            async with aclosing(generate(self.state, call)) as outputs:
                async for item in outputs:
                    yield item
        except ApiError as exc:
            await abort(context, exc.code, exc.message)

    def _logprobs(self, logprobs: list[TokenLogprob]) -> list[pb.TokenLogprob]:
        tokenizer = self.state.engine_loop.engine.tokenizer
        return [pb.TokenLogprob(token_id=lp.token_id, token=token_text(tokenizer, lp.token_id), logprob=lp.logprob,
                                top_logprobs=[pb.TopLogprob(token_id=t, token=token_text(tokenizer, t), logprob=v)
                                              for t, v in lp.top])
                for lp in logprobs]


def _served_by(resolved: Resolved | None) -> pb.ServedBy:
    if resolved is None:
        return pb.ServedBy()
    return pb.ServedBy(endpoint=resolved.endpoint, adapter=resolved.adapter, soft_prompt=resolved.soft_prompt)
