"""Asyncio Python client for a loraplex server: the surface of `Client`, on `grpc.aio`."""
from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from loraplex.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

from .client import (
    REGISTRATION_RETRY_WAITS,
    Completion,
    LoraplexError,
    Scored,
    StreamEvent,
    auth_metadata,
    channel_credentials,
    completion,
    endpoint_message,
    new_key,
    score_request,
    scored,
    stream_event,
    to_dict,
    upload_requests,
)
from .options import GenerateOptions, generate_call

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncClient"]


class AsyncClient:
    """A connection to one loraplex server for asyncio code; create it inside the event loop
    that uses it, and `async with` it or `await close()`.

    Errors as in `Client`: `LoraplexError` from the server, `ValueError` for arguments refused
    before anything is sent.
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
        self._channel = (grpc.aio.secure_channel(target, credentials) if credentials
                         else grpc.aio.insecure_channel(target))
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._inference_md, self._admin_md = auth_metadata(api_key, admin_token)
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- inference ---

    async def generate(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> Completion:
        """`Client.generate` on asyncio; the options are `GenerateOptions`'."""
        call = generate_call(prompt, options)
        return completion(await self._call(self._inference.Generate, call.request, self._inference_md, call.timeout))

    async def score(self, prompt: str | None = None, continuation: str = "", *, messages: list[dict] | None = None,
                    endpoint: str = "", adapter: str = "", soft_prompt: str = "", top_logprobs: int = 0,
                    timeout: float | None = None) -> Scored:
        """`Client.score` on asyncio."""
        request = score_request(prompt, continuation, messages, endpoint, adapter, soft_prompt, top_logprobs)
        return scored(await self._call(self._inference.Score, request, self._inference_md, timeout))

    def stream(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> AsyncIterator[StreamEvent]:
        """`async for event in client.stream(...)`: deltas, then one final event; the options are
        `generate`'s, checked at once. Leaving the loop early (or `aclose()`) cancels the request
        on the server."""
        call = generate_call(prompt, options)
        return self._stream(call.request, call.timeout)

    async def _stream(self, request: inference_pb2.GenerateRequest, timeout: float | None) -> AsyncIterator[StreamEvent]:
        call = self._inference.GenerateStream(request, metadata=self._inference_md, timeout=self._timeout(timeout))
        try:
            async for response in call:
                yield stream_event(response)
        except grpc.RpcError as exc:
            raise LoraplexError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    # --- adapters ---

    async def register_adapter(self, name: str, path: str, *, idempotency_key: str | None = None) -> dict:
        """As `Client.register_adapter`: retried while UNAVAILABLE, under one idempotency key."""
        request = admin_pb2.RegisterAdapterRequest(name=name, path=path, idempotency_key=idempotency_key or new_key())
        return await retried(lambda: self._admin_call("RegisterAdapter", request))

    async def upload_adapter(self, name: str, local_dir: str | os.PathLike, chunk_size: int = 1 << 20, *,
                             idempotency_key: str | None = None) -> dict:
        """Upload every file of the flat local directory `local_dir` and register it as `name`;
        retried as `register_adapter` is. Files are read in the event loop's thread, one chunk at a time.
        """
        key = idempotency_key or new_key()
        upload_requests(name, local_dir, chunk_size)  # a bad directory fails now, before any call

        async def attempt() -> dict:
            requests = upload_requests(name, local_dir, chunk_size, key)
            return to_dict(await self._call(self._admin.UploadAdapter, requests, self._admin_md, None))

        return await retried(attempt)

    async def get_adapter(self, ref: str) -> dict:
        return await self._admin_call("GetAdapter", admin_pb2.AdapterRef(name=ref))

    async def list_adapters(self) -> list[dict]:
        """Every version of every adapter, by name then version (all pages)."""
        return await self._all_pages("ListAdapters", admin_pb2.ListAdaptersRequest, "adapters")

    async def delete_adapter(self, ref: str) -> list[dict]:
        return (await self._admin_call("DeleteAdapter", admin_pb2.AdapterRef(name=ref))).get("deleted", [])

    async def pin(self, ref: str) -> dict:
        return await self._admin_call("PinAdapter", admin_pb2.AdapterRef(name=ref))

    async def unpin(self, ref: str) -> dict:
        return await self._admin_call("UnpinAdapter", admin_pb2.AdapterRef(name=ref))

    # --- endpoints ---

    async def create_endpoint(
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
        return await self._admin_call("CreateEndpoint", endpoint_message(
            name, adapter=adapter, soft_prompt=soft_prompt, template=template, system_message=system_message,
            defaults=defaults, max_new_tokens_cap=max_new_tokens_cap, canary=canary,
        ))

    async def update_endpoint(
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
        return await self._admin_call("UpdateEndpoint", endpoint_message(
            name, adapter=adapter, soft_prompt=soft_prompt, template=template, system_message=system_message,
            defaults=defaults, max_new_tokens_cap=max_new_tokens_cap, canary=canary,
        ))

    async def get_endpoint(self, name: str) -> dict:
        return await self._admin_call("GetEndpoint", admin_pb2.EndpointRef(name=name))

    async def list_endpoints(self) -> list[dict]:
        """Every endpoint, by name (all pages)."""
        return await self._all_pages("ListEndpoints", admin_pb2.ListEndpointsRequest, "endpoints")

    async def delete_endpoint(self, name: str) -> None:
        await self._admin_call("DeleteEndpoint", admin_pb2.EndpointRef(name=name))

    async def server_info(self) -> dict:
        return await self._admin_call("GetServerInfo", admin_pb2.Empty())

    # --- plumbing ---

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _call(self, method: Any, request: Any, metadata: tuple, timeout: float | None) -> Any:
        try:
            return await method(request, metadata=metadata, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise LoraplexError.from_rpc_error(exc) from None

    async def _admin_call(self, rpc: str, request: Message) -> dict:
        return to_dict(await self._call(getattr(self._admin, rpc), request, self._admin_md, None))

    async def _all_pages(self, rpc: str, request_type: type, field: str) -> list[dict]:
        items: list[dict] = []
        token = ""
        while True:
            page = await self._admin_call(rpc, request_type(page_token=token))
            items += page.get(field, [])
            token = page.get("next_page_token", "")
            if not token:
                return items


async def retried(call: Any) -> Any:
    """`await call()`, tried again after each of REGISTRATION_RETRY_WAITS while it fails UNAVAILABLE."""
    for wait in REGISTRATION_RETRY_WAITS:
        try:
            return await call()
        except LoraplexError as exc:
            if exc.code != "UNAVAILABLE":
                raise
        await asyncio.sleep(wait)
    return await call()

