"""The options of a generation call, defined once for `Client` and `AsyncClient`.

`generate` and `stream`, sync and asyncio alike, take the prompt and then
`**options: Unpack[GenerateOptions]`: type checkers and IDEs complete and check every keyword
from the TypedDict below (PEP 692), and `generate_call` checks the names again at run time (an
unknown keyword is a TypeError naming it, as for any Python function) and builds the request.
The four methods once spelt the same sixteen keywords out each, so an option added to one
could be forgotten in another; now they cannot differ.

Like client.py, this module imports only protobuf and the generated stubs.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import NamedTuple, TypedDict

from loraplex.v1 import inference_pb2

__all__ = ["GenerateCall", "GenerateOptions", "OPTION_NAMES", "SAMPLING_FIELDS", "generate_call"]


class GenerateOptions(TypedDict, total=False):
    """The keyword options of `generate` and `stream`. Each may be left out or given as None:
    an unset sampling option takes the endpoint's default, then the server's. Zero is a value
    (`temperature=0.0` asks for greedy decoding)."""

    messages: Sequence[Mapping[str, str]] | None
    """Chat turns, each `{"role", "content"}`, instead of the prompt: give exactly one of the two."""
    endpoint: str | None
    """The task endpoint to call; it brings its adapter, soft prompt, template and defaults."""
    adapter: str | None
    """A LoRA adapter to apply directly: "name" (its latest version) or "name@version"."""
    soft_prompt: str | None
    """A soft prompt to apply directly, named as `adapter` is."""
    max_new_tokens: int | None
    """At most this many generated tokens (finish reason "length")."""
    temperature: float | None
    """Sampling temperature; 0 is greedy."""
    top_p: float | None
    """Sample only from the most likely tokens whose probabilities add up to this."""
    top_k: int | None
    """Sample only from this many most likely tokens; 0 is no limit."""
    seed: int | None
    """Makes sampling repeatable; completion i of `n` uses seed + i."""
    stop: str | Sequence[str] | None
    """A stop string, or several: the text ends before the first match (finish reason "stop")."""
    ignore_eos: bool | None
    """Generate past the model's end token, up to `max_new_tokens`."""
    n: int | None
    """Completions of the one prompt (default 1); `Completion.choices` holds them all."""
    logprobs: bool | None
    """Return each generated token's log-probability (before temperature and filtering)."""
    top_logprobs: int | None
    """With `logprobs`: also this many most likely tokens at each position."""
    request_id: str | None
    """The request's id (the server makes one when unset); an id still in flight is refused."""
    timeout: float | None
    """Deadline of this call in seconds; unset: the client's own `timeout`."""


OPTION_NAMES: tuple[str, ...] = tuple(GenerateOptions.__annotations__)
REQUEST_FIELDS = ("endpoint", "adapter", "soft_prompt", "request_id")  # GenerateRequest's own fields
SAMPLING_FIELDS: tuple[str, ...] = tuple(
    name for name in OPTION_NAMES if name not in ("messages", "timeout", *REQUEST_FIELDS)
)


class GenerateCall(NamedTuple):
    """What one generate or stream call sends: the request, and its deadline (None: the client's)."""

    request: inference_pb2.GenerateRequest
    timeout: float | None


def check_names(options: Mapping[str, object]) -> None:
    """TypeError for any keyword that is not an option, naming it and listing the options."""
    unknown = [name for name in options if name not in OPTION_NAMES]
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], OPTION_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TypeError(f"unexpected keyword argument {', '.join(map(repr, unknown))}{hint}; "
                    f"the options are: {', '.join(OPTION_NAMES)}")


def sampling_parameters(options: GenerateOptions) -> inference_pb2.SamplingParameters:
    """SamplingParameters with only the given (non-None) options present: presence matters,
    since an absent field takes the endpoint's, then the server's default."""
    params = inference_pb2.SamplingParameters()
    for name in SAMPLING_FIELDS:
        value = options.get(name)
        if value is not None and name != "stop":
            setattr(params, name, value)
    stop = options.get("stop")
    if stop is not None:
        params.stop.extend([stop] if isinstance(stop, str) else stop)
    return params


def generate_call(prompt: str | None, options: GenerateOptions) -> GenerateCall:
    """The request for `prompt` (or `options["messages"]`) with `options`, checked before anything is sent."""
    check_names(options)
    request = inference_pb2.GenerateRequest()
    set_input(request, prompt, options.get("messages"))
    for name in REQUEST_FIELDS:
        setattr(request, name, options.get(name) or "")
    request.sampling.CopyFrom(sampling_parameters(options))
    return GenerateCall(request, options.get("timeout"))


def set_input(request: inference_pb2.GenerateRequest | inference_pb2.ScoreRequest, prompt: str | None,
              messages: Sequence[Mapping[str, str]] | None) -> None:
    """The request's input: the prompt or the chat turns, exactly one of them."""
    if prompt is not None and messages is None:
        request.prompt = prompt
    elif messages is not None and prompt is None:
        request.chat.messages.extend(inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        raise ValueError("give exactly one of prompt or messages")
