"""One validation path from any front's generate call to the engine's Request.

A front (gRPC now, HTTP later) fills a `GenerateCall` with what the client sent; `resolve`
checks it, applies the endpoint (adapter versions, canary split, template, system message,
defaults, cap) and the server's defaults, and returns the engine request plus what served it.
Errors are `ApiError`s carrying a status name the front maps to its own codes.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from loraplex.adapters_store.errors import StoreError
from loraplex.adapters_store.names import parse_ref
from loraplex.adapters_store.store import AdapterStore
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "n", "logprobs",
                   "top_logprobs")
STORE_CODES = {"invalid": "INVALID_ARGUMENT", "not_found": "NOT_FOUND", "already_exists": "ALREADY_EXISTS",
               "failed_precondition": "FAILED_PRECONDITION", "unavailable": "UNAVAILABLE"}


class ApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # a gRPC status name: INVALID_ARGUMENT, NOT_FOUND, ...
        self.message = message


def store_error(exc: StoreError) -> ApiError:
    return ApiError(STORE_CODES.get(exc.code, "INTERNAL"), str(exc))


@dataclass
class GenerateCall:
    endpoint: str = ""
    adapter: str = ""
    soft_prompt: str = ""
    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # only the fields the client set
    request_id: str = ""
    # when the client stops waiting, in time.monotonic() terms (gRPC's deadline); None: never.
    # An end past it is counted as deadline_exceeded, not as the client's cancel (generation.py)
    deadline: float | None = None
    # score the prompt's tokens from this index on instead of generating (scoring.py)
    score_from: int | None = None
    continuation: str | None = None  # or score this text after the prompt (loraplex.v1 Score)


@dataclass
class ServerDefaults:
    max_new_tokens: int = 256  # when neither request nor endpoint says
    max_new_tokens_limit: int = 4096  # no request may ask for more
    # blunt outer bounds on what reaches the engine, which then bounds a text by the model's
    # context before tokenizing it (intake.py)
    max_prompt_chars: int = 1 << 20  # a prompt's characters; a chat's roles and contents together
    max_chat_messages: int = 2048  # OpenAI's own limit on a chat's messages


@dataclass
class Resolved:
    request: Request
    endpoint: str = ""
    adapter: str = ""  # "name@version" served, "" for none
    soft_prompt: str = ""


def resolve(call: GenerateCall, store: AdapterStore, defaults: ServerDefaults, rng: random.Random | None = None) -> Resolved:
    rng = rng or random
    prompt, messages = _input(call, defaults)
    sampling: dict[str, Any] = {}
    cap = defaults.max_new_tokens_limit
    adapter = soft = ""
    if call.endpoint:
        if call.adapter or call.soft_prompt:
            raise ApiError("INVALID_ARGUMENT", "give an endpoint or an adapter/soft_prompt, not both")
        try:
            ep = store.get_endpoint(call.endpoint)
        except StoreError as exc:
            raise store_error(exc) from None
        adapter = ep.adapter or ""
        if ep.canary_adapter and rng.random() < ep.canary_weight:
            adapter = ep.canary_adapter
        soft = ep.soft_prompt or ""
        prompt, messages = _apply_endpoint(ep.template, ep.system_message, prompt, messages)
        sampling.update({k: v for k, v in ep.defaults.items() if v is not None})
        if ep.max_new_tokens_cap is not None:
            cap = min(cap, ep.max_new_tokens_cap)
    else:
        adapter = _version(store, call.adapter, "lora") if call.adapter else ""
        soft = _version(store, call.soft_prompt, "soft_prompt") if call.soft_prompt else ""
    sampling.update({k: v for k, v in call.sampling.items() if v is not None})
    params = _params(sampling, defaults, cap)
    request = Request(prompt=prompt, messages=messages, adapter=adapter or None, soft_prompt=soft or None,
                      params=params, request_id=call.request_id or uuid.uuid4().hex,
                      fit_max_new_tokens="max_new_tokens" not in sampling, score_from=call.score_from,
                      continuation=call.continuation)
    return Resolved(request, call.endpoint, adapter, soft)


def _input(call: GenerateCall, defaults: ServerDefaults) -> tuple[str | None, list[dict] | None]:
    if call.prompt is None and call.messages is None:
        raise ApiError("INVALID_ARGUMENT", "give a prompt or chat messages")
    if call.prompt is not None:
        if not call.prompt:
            raise ApiError("INVALID_ARGUMENT", "the prompt is empty")
        if len(call.prompt) > defaults.max_prompt_chars:
            raise ApiError("INVALID_ARGUMENT", f"the prompt has {len(call.prompt)} characters, "
                                               f"more than the server's limit of {defaults.max_prompt_chars}")
        return call.prompt, None
    messages = call.messages or []
    if not messages:
        raise ApiError("INVALID_ARGUMENT", "the chat has no messages")
    if len(messages) > defaults.max_chat_messages:
        raise ApiError("INVALID_ARGUMENT", f"the chat has {len(messages)} messages, more than the server's limit of "
                                           f"{defaults.max_chat_messages}; send fewer turns")
    for i, m in enumerate(messages):
        if not m.get("role"):
            raise ApiError("INVALID_ARGUMENT", f"chat message {i} has no role")
    size = sum(len(m.get("role", "")) + len(m.get("content", "")) for m in messages)
    if size > defaults.max_prompt_chars:
        raise ApiError("INVALID_ARGUMENT", f"the chat's roles and contents have {size} characters, more than the "
                                           f"server's limit of {defaults.max_prompt_chars}")
    return None, messages


def _apply_endpoint(template: str, system: str, prompt: str | None, messages: list[dict] | None):
    """The template wraps a prompt (or the last user turn of a chat); the system message leads a
    chat that has none of its own."""
    if prompt is not None:
        return (template.format(input=prompt) if template else prompt), None
    messages = [dict(m) for m in messages]
    if template:
        for m in reversed(messages):
            if m["role"] == "user":
                m["content"] = template.format(input=m.get("content", ""))
                break
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return None, messages


def _version(store: AdapterStore, ref: str, kind: str) -> str:
    """'name' or 'name@v' -> the exact 'name@v' of a registered adapter of `kind`."""
    try:
        parse_ref(ref)
        record = store.get(ref)
    except StoreError as exc:
        raise store_error(exc) from None
    if record.kind != kind:
        field_name = "adapter" if record.kind == "lora" else "soft_prompt"
        raise ApiError("INVALID_ARGUMENT", f"{record.ref} is a {record.kind.replace('_', ' ')}; pass it as {field_name}")
    return record.ref


def _params(sampling: dict[str, Any], defaults: ServerDefaults, cap: int) -> SamplingParams:
    max_new = sampling.get("max_new_tokens", min(defaults.max_new_tokens, cap))
    if not isinstance(max_new, int) or max_new < 1:
        raise ApiError("INVALID_ARGUMENT", f"max_new_tokens must be at least 1, got {max_new}")
    if max_new > cap:
        raise ApiError("INVALID_ARGUMENT", f"max_new_tokens {max_new} is over the limit of {cap}")
    fields = {k: sampling[k] for k in SAMPLING_FIELDS if k in sampling}
    fields["max_new_tokens"] = max_new
    if "stop" in fields:
        fields["stop"] = tuple(fields["stop"])
    try:
        params = SamplingParams(**fields)
        params.validate()
    except (TypeError, ValueError) as exc:
        raise ApiError("INVALID_ARGUMENT", str(exc)) from None
    return params
