"""OpenAI request bodies in, OpenAI response objects out.

`parse_completion` / `parse_chat` check a `/v1/completions` or `/v1/chat/completions` body field
by field (a wrong field is a 400 naming it, as `param`) and map it onto a `GenerateCall`; the
sampling values then go through the same validation as gRPC's (`generate_request.resolve`).
Fields loraplex cannot honour (penalties, logit_bias, tools, ...) are refused by name rather
than silently ignored. `top_k` and `ignore_eos` are accepted as extensions, as vLLM does.

`Choices` gathers engine outputs per completion index and renders them as OpenAI objects.
Log-probabilities are the model's own (before temperature and filtering); each token is shown
decoded on its own, so a token holding part of a multi-byte character shows as U+FFFD.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from loraplex.server.engine.sampler import TokenLogprob
from loraplex.server.engine.sequence import RequestOutput

from .generate_request import ApiError, GenerateCall

FINISH = {"length": "length", "stop": "stop", "eos": "stop"}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' integer `logprobs`


class OpenAIError(ApiError):
    """An ApiError that names the request field at fault (OpenAI's `param`)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(code, message)
        self.param = param


@dataclass
class OpenAIRequest:
    model: str
    call: GenerateCall  # endpoint/adapter/soft_prompt are filled in once `model` resolves
    chat: bool
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    echo: str = ""  # /v1/completions echo: the prompt, put in front of the text


def _bad(param: str, message: str) -> OpenAIError:
    return OpenAIError("INVALID_ARGUMENT", message, param)


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad(name, f"'{name}' must be an integer, got {_type_name(value)}")
    return value


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
        raise _bad(name, f"'{name}' must be a number, got {_type_name(value)}")
    return value


def _bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be a boolean, got {_type_name(value)}")
    return value


def _stop(body: dict) -> list[str] | None:
    value = body.get("stop")
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise _bad("stop", f"'stop' must be a string or an array of strings, got {_type_name(value)}")


def _unsupported(body: dict) -> None:
    """Refuse, by name, options that would change the output in ways loraplex does not implement."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name)
        if value:
            raise _bad(name, f"'{name}' is not supported (only 0)")
    bias = body.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or bias):
        raise _bad("logit_bias", "'logit_bias' is not supported")


def _common(body: dict, chat: bool) -> tuple[str, dict[str, Any], bool, bool]:
    """model, sampling fields, stream, include_usage."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "'model' is required: the name of an endpoint, an adapter or the base model"
                   if model is None else f"'model' must be a non-empty string, got {_type_name(model)}")
    _unsupported(body)
    n = _int(body, "n")
    best_of = None if chat else _int(body, "best_of")
    if best_of is not None and best_of != (n or 1):
        raise _bad("best_of", "'best_of' other than n is not supported")
    max_tokens = _int(body, "max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    sampling = {"max_new_tokens": max_tokens, "temperature": _number(body, "temperature"),
                "top_p": _number(body, "top_p"), "top_k": _int(body, "top_k"), "seed": _int(body, "seed"),
                "stop": _stop(body), "ignore_eos": _bool(body, "ignore_eos"), "n": n}
    if sampling["top_k"] == -1:  # vLLM's spelling of "off"
        sampling["top_k"] = 0
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(options, dict):
            raise _bad("stream_options", f"'stream_options' must be an object, got {_type_name(options)}")
        include_usage = bool(_bool(options, "include_usage"))
    return model, sampling, stream, include_usage


def parse_completion(body: dict) -> OpenAIRequest:
    """A `/v1/completions` body (one prompt per request)."""
    model, sampling, stream, include_usage = _common(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", "'prompt' is required" if prompt is None else
                   "'prompt' must be a string (or an array holding one string); send one prompt per request")
    suffix = body.get("suffix")
    if suffix:
        raise _bad("suffix", "'suffix' is not supported")
    logprobs = _int(body, "logprobs")
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise _bad("logprobs", f"'logprobs' must be in [0, {MAX_COMPLETION_LOGPROBS}], got {logprobs}")
        sampling.update(logprobs=True, top_logprobs=logprobs)
    echo = bool(_bool(body, "echo"))
    scoring = echo and logprobs is not None and sampling["max_new_tokens"] == 0
    if echo and logprobs is not None and not scoring:
        raise _bad("echo", "'echo' with 'logprobs' scores the prompt: it needs 'max_tokens' 0 (nothing generated)")
    if scoring and stream:
        raise _bad("stream", "scoring a prompt ('echo', 'logprobs', 'max_tokens' 0) is not streamed")
    if scoring:
        sampling["max_new_tokens"] = None
    call = GenerateCall(prompt=prompt, sampling=sampling, score_from=1 if scoring else None)
    return OpenAIRequest(model, call, chat=False, stream=stream, include_usage=include_usage,
                         echo=prompt if echo else "")


def parse_chat(body: dict) -> OpenAIRequest:
    """A `/v1/chat/completions` body (text content only, no tools)."""
    model, sampling, stream, include_usage = _common(body, chat=True)
    for name in ("tools", "functions"):
        if body.get(name):
            raise _bad(name, f"'{name}' is not supported")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _bad("response_format", "only 'response_format' {\"type\": \"text\"} is supported")
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs")
    if top is not None and not logprobs:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs' to be true")
    if logprobs:
        sampling.update(logprobs=True, top_logprobs=top or 0)
    call = GenerateCall(messages=_messages(body.get("messages")), sampling=sampling)
    return OpenAIRequest(model, call, chat=True, stream=stream, include_usage=include_usage)


def _messages(value: Any) -> list[dict]:
    if value is None:
        raise _bad("messages", "'messages' is required")
    if not isinstance(value, list) or not value:
        raise _bad("messages", "'messages' must be a non-empty array")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"'{where}' must be an object, got {_type_name(m)}")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            got = repr(role[:40]) if isinstance(role, str) else _type_name(role)
            raise _bad(f"{where}.role", f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {got}")
        out.append({"role": CHAT_ROLES[role], "content": _content(m.get("content"), f"{where}.content", role)})
    return out


def _content(value: Any, where: str, role: str) -> str:
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}[{j}]", f"'{where}[{j}]' must be a text part "
                                            "({\"type\": \"text\", \"text\": ...}); only text is supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(where, f"'{where}' must be a string or an array of text parts, got {_type_name(value)}")


# ----------------------------------------------------------------------------- responses


@dataclass
class Choice:
    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    scored: list[TokenLogprob] = field(default_factory=list)  # a scored prompt's tokens after the first
    context_ids: list[int] = field(default_factory=list)  # and its first


class Choices:
    """Engine outputs gathered by completion index, rendered the way OpenAI's API shows them."""

    def __init__(self, request: OpenAIRequest, model: str, created: int, token_text: Callable[[int], str]) -> None:
        self.request = request
        self.model = model
        self.created = created
        self.token_text = token_text
        self.by_index: dict[int, Choice] = {}
        self.prompt_tokens = 0
        self.id = ""
        self.logprobs = bool(request.call.sampling.get("logprobs"))

    def add(self, out: RequestOutput) -> Choice:
        self.id = ("chatcmpl-" if self.request.chat else "cmpl-") + out.request_id
        self.prompt_tokens = out.prompt_tokens
        choice = self.by_index.setdefault(out.index, Choice(out.index))
        choice.text += out.text
        choice.logprobs += out.logprobs
        choice.scored += out.prompt_logprobs
        choice.context_ids += out.context_ids
        choice.completion_tokens = out.completion_tokens
        if out.finish_reason is not None:
            choice.finish_reason = FINISH.get(out.finish_reason, out.finish_reason)
        return choice

    def usage(self) -> dict:
        completion = sum(c.completion_tokens for c in self.by_index.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def response(self) -> dict:
        """The whole (non-streamed) response."""
        choices = []
        for i in sorted(self.by_index):
            c = self.by_index[i]
            if self.request.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                                "logprobs": self._logprobs(c.logprobs, 0), "finish_reason": c.finish_reason})
            else:
                lp = self._scored(c) if self.request.call.score_from else self._logprobs(c.logprobs, 0)
                choices.append({"index": i, "text": self.request.echo + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "chat.completion" if self.request.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(),
                "system_fingerprint": None}

    def chunk(self, out: RequestOutput, offset: int, first: bool) -> dict:
        """One streamed chunk for output `out` (whose text starts at `offset` in its choice);
        `first`: the choice's first chunk (chat sends the role there, completions the echo)."""
        lp = self._logprobs(out.logprobs, offset)
        reason = FINISH.get(out.finish_reason, out.finish_reason) if out.finish_reason else None
        if self.request.chat:
            delta: dict[str, Any] = {"content": out.text}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": out.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            text = (self.request.echo if first else "") + out.text
            choice = {"index": out.index, "text": text, "logprobs": lp, "finish_reason": reason}
            kind = "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice],
                 "system_fingerprint": None}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict:
        """The last chunk when stream_options.include_usage: no choices, the usage."""
        return {"id": self.id, "object": "chat.completion.chunk" if self.request.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage(),
                "system_fingerprint": None}

    def _scored(self, c: Choice) -> dict:
        """A scored prompt as OpenAI's echo shows it: every prompt token, the first without a
        log-probability (nothing predicts it)."""
        shown = self._logprobs([TokenLogprob(t, 0.0) for t in c.context_ids] + c.scored, -len(self.request.echo))
        for i in range(len(c.context_ids)):
            shown["token_logprobs"][i] = None
            if shown["top_logprobs"] is not None:
                shown["top_logprobs"][i] = None
        return shown

    def _logprobs(self, logprobs: list[TokenLogprob], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        name = self.token_text
        if self.request.chat:
            def entry(token_id: int, value: float) -> dict:
                text = name(token_id)
                return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

            return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                                for lp in logprobs], "refusal": None}
        tokens = [name(lp.token_id) for lp in logprobs]
        offsets = []
        position = offset + len(self.request.echo)
        for text in tokens:
            offsets.append(position)
            position += len(text)
        top = []
        for lp in logprobs:  # tokens that decode alike (parts of one character) keep the likeliest value
            entry: dict[str, float] = {}
            for t, v in lp.top:
                entry.setdefault(name(t), v)
            top.append(entry)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": top if self.request.call.sampling.get("top_logprobs") else None,
                "text_offset": offsets}
