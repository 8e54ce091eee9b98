"""Synchronous Python client for a loraplex server (gRPC).

This module imports only grpcio and protobuf, so `loraplex complete` starts fast. The
request builders and response converters here, and the generation options with their one
builder (options.py), are shared with the asyncio client (aio.py).
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from loraplex.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

from .options import GenerateOptions, generate_call, set_input

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Client", "Completion", "GenerateOptions", "LoraplexError", "ServedBy", "StreamEvent"]

# Seconds to wait before each retry of a registration the server answered UNAVAILABLE (it was
# restarting, or the connection dropped after the request was sent): the call's idempotency key
# makes a retry return the version the first attempt may have created, never a second one.
REGISTRATION_RETRY_WAITS = (0.5, 1.0, 2.0, 4.0)

FINISH_REASONS = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_EOS: "eos",
}


class LoraplexError(Exception):
    """A call the server refused or could not complete.

    `code` is the gRPC status name ("NOT_FOUND", "INVALID_ARGUMENT", "UNAVAILABLE", ...) and
    `message` the server's own explanation.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> LoraplexError:
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else None
        return cls(code.name if code is not None else "UNKNOWN", details or str(error))


@dataclass(frozen=True)
class ServedBy:
    """Which versions served a request ("name@version"; "" for none)."""

    endpoint: str = ""
    adapter: str = ""
    soft_prompt: str = ""


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "stop" | "eos"
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    endpoint: str = ""
    adapter: str = ""  # served "name@version", "" for none
    soft_prompt: str = ""
    # with logprobs=True: per token {"token_id", "token", "logprob", "top_logprobs": [{"token_id", "token", "logprob"}]}
    logprobs: list[dict] = field(default_factory=list)
    # with n > 1: every completion as {"index", "text", "token_ids", "finish_reason", "completion_tokens", "logprobs"};
    # the fields above are completion 0's (usage counts them all)
    choices: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class StreamEvent:
    """One message of a stream: a delta (text, token_ids) or, last, the end (finish_reason, usage)."""

    request_id: str
    served_by: ServedBy
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # set on the final event only
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    index: int = 0  # which completion a delta belongs to (n > 1)
    logprobs: list[dict] = field(default_factory=list)  # per token id of a delta, with logprobs=True
    finish_reasons: list[str] = field(default_factory=list)  # on the final event, by completion index, when n > 1

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


# --- request builders -----------------------------------------------------------------------

def endpoint_message(
    name: str,
    *,
    adapter: str | None = None,
    soft_prompt: str | None = None,
    template: str = "",
    system_message: str = "",
    defaults: dict | None = None,
    max_new_tokens_cap: int | None = None,
    canary: tuple[str, float] | None = None,
) -> admin_pb2.Endpoint:
    """An Endpoint message. `defaults` takes SamplingParameters fields in their JSON form
    (e.g. `{"temperature": 0.2, "stop": ["\\n"]}`), as `get_endpoint` returns them."""
    endpoint = admin_pb2.Endpoint(
        name=name, adapter=adapter or "", soft_prompt=soft_prompt or "",
        template=template or "", system_message=system_message or "",
    )
    if defaults:
        try:
            json_format.ParseDict(defaults, endpoint.defaults)
        except json_format.ParseError as exc:
            raise ValueError(f"bad endpoint defaults: {exc}") from None
    if max_new_tokens_cap is not None:
        endpoint.max_new_tokens_cap = max_new_tokens_cap
    if canary is not None:
        endpoint.canary.adapter, endpoint.canary.weight = canary
    return endpoint


def adapter_files(local_dir: str | os.PathLike) -> list[Path]:
    """The files to upload, checked before anything is sent: the server stores a flat
    directory, so a subdirectory or symlink is refused here rather than half-uploaded."""
    root = Path(local_dir)
    if not root.is_dir():
        raise ValueError(f"adapter directory {str(root)!r} does not exist or is not a directory")
    files = []
    for entry in sorted(root.iterdir()):
        if entry.is_symlink():
            raise ValueError(f"{str(entry)!r} is a symlink; adapter uploads take regular files only")
        if entry.is_dir():
            raise ValueError(f"{str(entry)!r} is a subdirectory; adapter uploads take a flat directory")
        if not entry.is_file():
            raise ValueError(f"{str(entry)!r} is not a regular file")
        files.append(entry)
    if not files:
        raise ValueError(f"adapter directory {str(root)!r} is empty")
    return files


def upload_requests(name: str, local_dir: str | os.PathLike, chunk_size: int,
                    idempotency_key: str = "") -> Iterator[admin_pb2.UploadAdapterRequest]:
    """The upload's messages: the name (and idempotency key) first, then each file as chunks (an
    empty file still sends one, empty, chunk). The directory is checked now; files are read as
    gRPC sends."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    files = adapter_files(local_dir)

    def messages() -> Iterator[admin_pb2.UploadAdapterRequest]:
        yield admin_pb2.UploadAdapterRequest(name=name, idempotency_key=idempotency_key)
        for path in files:
            with open(path, "rb") as f:
                data = f.read(chunk_size)
                yield admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(path=path.name, data=data))
                while data := f.read(chunk_size):
                    yield admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(path=path.name, data=data))

    return messages()


# --- response converters --------------------------------------------------------------------

def to_dict(message: Message) -> dict:
    """A message as a JSON-ready dict (proto field names; fields without presence always shown)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def served_by(message: inference_pb2.ServedBy) -> ServedBy:
    return ServedBy(endpoint=message.endpoint, adapter=message.adapter, soft_prompt=message.soft_prompt)


def finish_reason(value: int) -> str:
    return FINISH_REASONS.get(value, "")


@dataclass
class Scored:
    """A continuation's teacher-forced log-probabilities (`Client.score`)."""

    tokens: list[dict]  # per continuation token {"token_id", "token", "logprob", "top_logprobs"}
    total_logprob: float  # log p(continuation | prompt)
    prompt_tokens: int  # the prompt's and the continuation's
    request_id: str
    endpoint: str = ""
    adapter: str = ""  # served "name@version", "" for none
    soft_prompt: str = ""


def token_logprobs(values: Sequence[inference_pb2.TokenLogprob]) -> list[dict]:
    return [to_dict(v) for v in values]


def score_request(prompt: str | None, continuation: str, messages: list[dict] | None, endpoint: str, adapter: str,
                  soft_prompt: str, top_logprobs: int) -> inference_pb2.ScoreRequest:
    request = inference_pb2.ScoreRequest(endpoint=endpoint, adapter=adapter, soft_prompt=soft_prompt,
                                         continuation=continuation, top_logprobs=top_logprobs)
    set_input(request, prompt, messages)
    return request


def scored(response: inference_pb2.ScoreResponse) -> Scored:
    return Scored(tokens=token_logprobs(response.tokens), total_logprob=response.total_logprob,
                  prompt_tokens=response.usage.prompt_tokens, request_id=response.request_id,
                  endpoint=response.served_by.endpoint, adapter=response.served_by.adapter,
                  soft_prompt=response.served_by.soft_prompt)


def completion(response: inference_pb2.GenerateResponse) -> Completion:
    choices = [dict(to_dict(c), finish_reason=finish_reason(c.finish_reason)) for c in response.choices]
    return Completion(
        text=response.text, token_ids=list(response.token_ids),
        finish_reason=finish_reason(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens, completion_tokens=response.usage.completion_tokens,
        request_id=response.request_id, endpoint=response.served_by.endpoint,
        adapter=response.served_by.adapter, soft_prompt=response.served_by.soft_prompt,
        logprobs=token_logprobs(response.logprobs), choices=choices,
    )


def stream_event(response: inference_pb2.GenerateStreamResponse) -> StreamEvent:
    common = dict(request_id=response.request_id, served_by=served_by(response.served_by))
    if response.WhichOneof("event") == "end":
        end = response.end
        return StreamEvent(**common, finish_reason=finish_reason(end.finish_reason),
                           prompt_tokens=end.usage.prompt_tokens, completion_tokens=end.usage.completion_tokens,
                           finish_reasons=[finish_reason(r) for r in end.finish_reasons])
    delta = response.delta
    return StreamEvent(**common, text=delta.text, token_ids=list(delta.token_ids), index=delta.index,
                       logprobs=token_logprobs(delta.logprobs))


# --- channels -------------------------------------------------------------------------------

def _read(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def channel_credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS file is given (cert and key together for mutual TLS), else None."""
    if tls_cert is None and tls_key is None and tls_ca is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca) if tls_ca else None,
        private_key=_read(tls_key) if tls_key else None,
        certificate_chain=_read(tls_cert) if tls_cert else None,
    )


def auth_metadata(api_key: str | None, admin_token: str | None) -> tuple[tuple, tuple]:
    """(inference metadata, admin metadata)."""
    inference = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    admin = (("x-admin-token", admin_token),) if admin_token else ()
    return inference, admin


class Client:
    """A connection to one loraplex server; use as a context manager or call `close()`.

    Every method raises `LoraplexError` when the server refuses the call, and `ValueError` for
    arguments refused before anything is sent (`TypeError` for a keyword that is no option).
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        timeout: float | None = None,
    ):
        credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        self._channel = (grpc.secure_channel(target, credentials) if credentials
                         else grpc.insecure_channel(target))
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._inference_md, self._admin_md = auth_metadata(api_key, admin_token)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- inference ---

    def generate(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> Completion:
        """Generate a whole answer to `prompt` (or `messages=`); the options are `GenerateOptions`'.
        Sampling options left unset take the endpoint's, then the server's defaults."""
        call = generate_call(prompt, options)
        return completion(self._call(self._inference.Generate, call.request, self._inference_md, call.timeout))

    def stream(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> Iterator[StreamEvent]:
        """Generate as a stream of events: deltas, then one final event (`is_final`); the options
        are `generate`'s.

        Arguments are checked at once; the call starts on the first `next()`. Leaving the loop
        early (or closing the iterator) cancels the request on the server.
        """
        call = generate_call(prompt, options)
        return self._stream(call.request, call.timeout)

    def score(self, prompt: str | None = None, continuation: str = "", *, messages: list[dict] | None = None,
              endpoint: str = "", adapter: str = "", soft_prompt: str = "", top_logprobs: int = 0,
              timeout: float | None = None) -> Scored:
        """The log-probability of each token of `continuation` after `prompt` (or `messages`),
        teacher-forced, under the endpoint, adapter and/or soft prompt (or the base model)."""
        request = score_request(prompt, continuation, messages, endpoint, adapter, soft_prompt, top_logprobs)
        return scored(self._call(self._inference.Score, request, self._inference_md, timeout))

    def _stream(self, request: inference_pb2.GenerateRequest, timeout: float | None) -> Iterator[StreamEvent]:
        call = self._inference.GenerateStream(request, metadata=self._inference_md, timeout=self._timeout(timeout))
        try:
            for response in call:
                yield stream_event(response)
        except grpc.RpcError as exc:
            raise LoraplexError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    # --- adapters ---

    def register_adapter(self, name: str, path: str, *, idempotency_key: str | None = None) -> dict:
        """Register the adapter directory at `path` on the server's filesystem (inside one of its
        --adapter-root directories). Retried while the server is UNAVAILABLE, under one
        idempotency key (a new UUID unless given), so it registers one version at most."""
        request = admin_pb2.RegisterAdapterRequest(name=name, path=path, idempotency_key=idempotency_key or new_key())
        return retried(lambda: self._admin_call("RegisterAdapter", request))

    def upload_adapter(self, name: str, local_dir: str | os.PathLike, chunk_size: int = 1 << 20, *,
                       idempotency_key: str | None = None) -> dict:
        """Upload every file of the flat local directory `local_dir` and register it as `name`;
        retried as `register_adapter` is."""
        key = idempotency_key or new_key()
        upload_requests(name, local_dir, chunk_size)  # a bad directory fails now, before any call

        def attempt() -> dict:
            requests = upload_requests(name, local_dir, chunk_size, key)
            return to_dict(self._call(self._admin.UploadAdapter, requests, self._admin_md, None))

        return retried(attempt)

    def get_adapter(self, ref: str) -> dict:
        """"name" (its latest version) or "name@version"."""
        return self._admin_call("GetAdapter", admin_pb2.AdapterRef(name=ref))

    def list_adapters(self) -> list[dict]:
        """Every version of every adapter, by name then version (all pages)."""
        return self._all_pages("ListAdapters", admin_pb2.ListAdaptersRequest, "adapters")

    def delete_adapter(self, ref: str) -> list[dict]:
        """Delete "name@version", or every version of "name"; returns what was deleted."""
        return self._admin_call("DeleteAdapter", admin_pb2.AdapterRef(name=ref)).get("deleted", [])

    def pin(self, ref: str) -> dict:
        return self._admin_call("PinAdapter", admin_pb2.AdapterRef(name=ref))

    def unpin(self, ref: str) -> dict:
        return self._admin_call("UnpinAdapter", admin_pb2.AdapterRef(name=ref))

    # --- endpoints ---

    def create_endpoint(
        self,
        name: str,
        *,
        adapter: str | None = None,
        soft_prompt: str | None = None,
        template: str = "",
        system_message: str = "",
        defaults: dict | None = None,
        max_new_tokens_cap: int | None = None,
        canary: tuple[str, float] | None = None,
    ) -> dict:
        return self._admin_call("CreateEndpoint", endpoint_message(
            name, adapter=adapter, soft_prompt=soft_prompt, template=template, system_message=system_message,
            defaults=defaults, max_new_tokens_cap=max_new_tokens_cap, canary=canary,
        ))

    def update_endpoint(
        self,
        name: str,
        *,
        adapter: str | None = None,
        soft_prompt: str | None = None,
        template: str = "",
        system_message: str = "",
        defaults: dict | None = None,
        max_new_tokens_cap: int | None = None,
        canary: tuple[str, float] | None = None,
    ) -> dict:
        """Send the endpoint's new definition, whole: fields left out are sent empty."""
        return self._admin_call("UpdateEndpoint", endpoint_message(
            name, adapter=adapter, soft_prompt=soft_prompt, template=template, system_message=system_message,
            defaults=defaults, max_new_tokens_cap=max_new_tokens_cap, canary=canary,
        ))

    def get_endpoint(self, name: str) -> dict:
        return self._admin_call("GetEndpoint", admin_pb2.EndpointRef(name=name))

    def list_endpoints(self) -> list[dict]:
        """Every endpoint, by name (all pages)."""
        return self._all_pages("ListEndpoints", admin_pb2.ListEndpointsRequest, "endpoints")

    def delete_endpoint(self, name: str) -> None:
        self._admin_call("DeleteEndpoint", admin_pb2.EndpointRef(name=name))

    def server_info(self) -> dict:
        return self._admin_call("GetServerInfo", admin_pb2.Empty())

    # --- plumbing ---

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _call(self, method: Any, request: Any, metadata: tuple, timeout: float | None) -> Any:
        try:
            return method(request, metadata=metadata, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise LoraplexError.from_rpc_error(exc) from None

    def _admin_call(self, rpc: str, request: Message) -> dict:
        return to_dict(self._call(getattr(self._admin, rpc), request, self._admin_md, None))

    def _all_pages(self, rpc: str, request_type: type, field: str) -> list[dict]:
        items: list[dict] = []
        token = ""
        while True:
            page = self._admin_call(rpc, request_type(page_token=token))
            items += page.get(field, [])
            token = page.get("next_page_token", "")
            if not token:
                return items


def new_key() -> str:
    """A fresh idempotency key for one registration."""
    return uuid.uuid4().hex


def retried(call: Any) -> Any:
    """`call()`, tried again after each of REGISTRATION_RETRY_WAITS while it fails UNAVAILABLE."""
    for wait in REGISTRATION_RETRY_WAITS:
        try:
            return call()
        except LoraplexError as exc:
            if exc.code != "UNAVAILABLE":
                raise
        time.sleep(wait)
    return call()

