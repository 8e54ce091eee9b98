"""`GenerateOptions`, the one definition of the generation keywords, and the four methods that
take it (`Client.generate|stream`, `AsyncClient.generate|stream`), against the fake server."""
from __future__ import annotations

import asyncio
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence

import pytest

from loraplex.clients.aio import AsyncClient
from loraplex.clients.client import Client
from loraplex.clients.commands import SAMPLING_FLAGS, complete_parser
from loraplex.clients.options import OPTION_NAMES, REQUEST_FIELDS, SAMPLING_FIELDS, GenerateOptions
from loraplex.v1 import inference_pb2

OPTION_TYPES = {
    "messages": Sequence[Mapping[str, str]] | None,
    "endpoint": str | None,
    "adapter": str | None,
    "soft_prompt": str | None,
    "max_new_tokens": int | None,
    "temperature": float | None,
    "top_p": float | None,
    "top_k": int | None,
    "seed": int | None,
    "stop": str | Sequence[str] | None,
    "ignore_eos": bool | None,
    "n": int | None,
    "logprobs": bool | None,
    "top_logprobs": int | None,
    "request_id": str | None,
    "timeout": float | None,
}

# Every option, none at its default; the fake server echoes whatever it is sent.
EVERY_OPTION: GenerateOptions = {
    "messages": [{"role": "user", "content": "hello"}], "endpoint": "sql-task", "adapter": "sql@2",
    "soft_prompt": "polite", "max_new_tokens": 7, "temperature": 0.5, "top_p": 0.75, "top_k": 3, "seed": 11,
    "stop": ["\n", "END"], "ignore_eos": True, "n": 2, "logprobs": True, "top_logprobs": 4, "request_id": "r-9",
    "timeout": 30.0,
}
EVERY_OPTION_REQUEST = inference_pb2.GenerateRequest(
    endpoint="sql-task", adapter="sql@2", soft_prompt="polite", request_id="r-9",
    chat=inference_pb2.Chat(messages=[inference_pb2.ChatMessage(role="user", content="hello")]),
    sampling=inference_pb2.SamplingParameters(max_new_tokens=7, temperature=0.5, top_p=0.75, top_k=3, seed=11,
                                              stop=["\n", "END"], ignore_eos=True, n=2, logprobs=True,
                                              top_logprobs=4),
)


def _client_generate(target: str, *args: object, **kwargs: object) -> None:
    with Client(target) as client:
        client.generate(*args, **kwargs)


def _client_stream(target: str, *args: object, **kwargs: object) -> None:
    with Client(target) as client:
        list(client.stream(*args, **kwargs))


async def _async_generate(target: str, *args: object, **kwargs: object) -> None:
    async with AsyncClient(target) as client:
        await client.generate(*args, **kwargs)


async def _async_stream(target: str, *args: object, **kwargs: object) -> None:
    async with AsyncClient(target) as client:
        _ = [event async for event in client.stream(*args, **kwargs)]


CALLS: dict[str, Callable[..., None]] = {
    "Client.generate": _client_generate,
    "Client.stream": _client_stream,
    "AsyncClient.generate": lambda *args, **kwargs: asyncio.run(_async_generate(*args, **kwargs)),
    "AsyncClient.stream": lambda *args, **kwargs: asyncio.run(_async_stream(*args, **kwargs)),
}
METHODS = {"Client.generate": Client.generate, "Client.stream": Client.stream,
           "AsyncClient.generate": AsyncClient.generate, "AsyncClient.stream": AsyncClient.stream}


def test_type_hints_list_every_option_with_its_type():
    assert typing.get_type_hints(GenerateOptions) == OPTION_TYPES
    assert OPTION_NAMES == tuple(OPTION_TYPES)
    assert GenerateOptions.__optional_keys__ == frozenset(OPTION_TYPES)  # every option may be left out


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_takes_the_prompt_and_the_one_options_type(method):
    parameters = list(inspect.signature(METHODS[method]).parameters.values())
    assert [(p.name, p.kind) for p in parameters] == [
        ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ("prompt", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ("options", inspect.Parameter.VAR_KEYWORD),
    ]
    unpack = getattr(typing, "Unpack", None)
    if unpack is not None:  # Python 3.11+; on 3.10 the annotation exists for type checkers only
        assert typing.get_type_hints(METHODS[method])["options"] == unpack[GenerateOptions]


def test_sync_and_async_send_every_option_alike(fake_server):
    assert set(EVERY_OPTION) == set(OPTION_NAMES)
    for call in CALLS.values():
        call(fake_server.target, **EVERY_OPTION)
    assert fake_server.inference.requests == [EVERY_OPTION_REQUEST] * len(CALLS)
    # timeout=30.0 reached the server as the call's deadline (grpc.aio's clock may read it a little over)
    assert all(abs(left - 30.0) < 5.0 for left in fake_server.inference.deadlines), fake_server.inference.deadlines


@pytest.mark.parametrize("method", list(CALLS))
def test_the_prompt_is_positional_or_a_keyword(fake_server, method):
    CALLS[method](fake_server.target, "positional", max_new_tokens=3)
    CALLS[method](fake_server.target, prompt="keyword", top_k=0)
    first, second = fake_server.inference.requests
    assert (first.prompt, first.sampling.max_new_tokens, first.sampling.HasField("top_k")) == ("positional", 3, False)
    assert (second.prompt, second.sampling.top_k, second.sampling.HasField("max_new_tokens")) == ("keyword", 0, False)


@pytest.mark.parametrize("method", list(CALLS))
def test_an_unknown_keyword_is_a_type_error_naming_it(fake_server, method):
    with pytest.raises(TypeError) as caught:
        CALLS[method](fake_server.target, "hi", temperature=0.5, temprature=0.5)
    message = str(caught.value)
    assert "unexpected keyword argument 'temprature' (did you mean 'temperature'?)" in message
    assert message.endswith("the options are: " + ", ".join(OPTION_TYPES))
    with pytest.raises(TypeError, match="unexpected keyword argument 'frobnicate', 'extra'; the options"):
        CALLS[method](fake_server.target, "hi", frobnicate=1, extra=2)
    assert fake_server.inference.requests == []


def test_sampling_options_are_the_protos_sampling_fields():
    assert set(SAMPLING_FIELDS) == set(inference_pb2.SamplingParameters.DESCRIPTOR.fields_by_name)
    request_fields = set(inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert set(REQUEST_FIELDS) == request_fields - {"prompt", "chat", "sampling"}
    assert set(OPTION_NAMES) == {*SAMPLING_FIELDS, *REQUEST_FIELDS, "messages", "timeout"}


def test_complete_passes_its_option_flags_by_the_options_names():
    assert set(SAMPLING_FLAGS) <= set(SAMPLING_FIELDS)
    flags = vars(complete_parser().parse_args(["a prompt"]))
    assert set(flags) & set(OPTION_NAMES) == {"endpoint", "adapter", "soft_prompt", *SAMPLING_FLAGS, "timeout"}
