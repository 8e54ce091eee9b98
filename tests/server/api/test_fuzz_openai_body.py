"""Fuzzing the OpenAI body mapping: `openai_schema.parse_completion` and `parse_chat` on JSON
objects, then the rest of the HTTP front's validation path, as `openai_http._generate` runs it:
`openai_models.resolve_model`, `generate_request.resolve` against a real registry, and the
engine's `encode` (tokenizing, which `generation.generate` calls before queueing); and before
all that the body's bytes through `load_json`, as `openai_http._json` reads them.

The property: whatever JSON object a client posts, each step either accepts it or refuses it
the way the front answers a bad request: parsing and resolving with an `ApiError` (`OpenAIError`
names the field) whose status is a client's fault, encoding with `RequestError` or `ValueError`
(which `generation.generate` answers as INVALID_ARGUMENT); never another exception, never
slowly. What parsing accepts has the types the rest of the path relies on; whatever bytes are
posted, `load_json` reads them or raises what `_json` answers with a 400. Bodies are valid
completion and chat bodies with one field, or every field, set to a value of any JSON type
(numbers at the limits, NaN and infinities as json.loads reads `NaN` and `Infinity`, strings
with lone surrogates as `"\\ud800"` reads, huge strings), unknown fields, and messages of every
shape. The bytes are those bodies' JSON, nested too deep, with integers too long, cut short, with
invalid UTF-8 or a byte-order mark, or not an object.

Runs are fixed (derandomized, no example database) so they cannot flake; a longer run is one
command, e.g.

    LORAPLEX_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/server/api/test_fuzz_openai_body.py -k fuzz
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from fuzzing import SECONDS_PER_INPUT, any_json, fair_refusal, fuzz, refused, within
from hypothesis import example, given
from hypothesis import strategies as st

from loraplex.adapters_store import AdapterStore
from loraplex.server.api.generate_request import ServerDefaults, resolve
from loraplex.server.api.openai_http import JSONLimitError, load_json  # the body reader the front uses
from loraplex.server.api.openai_models import resolve_model
from loraplex.server.api.openai_schema import CHAT_ROLES, OpenAIError, OpenAIRequest, parse_chat, parse_completion
from loraplex.server.engine.intake import RequestError

BASE = "tiny"  # the base model's name, as `--model` would give it
DEFAULTS = ServerDefaults()
BODY_ERRORS = (UnicodeDecodeError, json.JSONDecodeError, JSONLimitError)  # what openai_http._json answers with a 400


# ---------------------------------------------------------------------------- JSON values

# what json.loads can give the front (load_json refuses integers over 100 digits)
EDGE_INTS = [-1, 0, 1, 2, 5, 6, 16, 17, 20, 21, 4096, 4097, 2**31, 2**63 - 1, 2**63, 2**64, -2**63, 10**99]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 1.0, 2.0]
EDGE_STRINGS = ["", " ", "\ud800", "a\udfffb", "\x00", "{input}", "\u202e", "x" * 10_000,
                "x" * (DEFAULTS.max_prompt_chars + 1)]
json_values = any_json(EDGE_INTS, EDGE_FLOATS, EDGE_STRINGS, max_leaves=10)
# any code points, lone surrogates included, as JSON's "\ud800" gives them (st.text leaves them out)
lone_surrogates = st.tuples(st.text(max_size=5), st.sampled_from(["\ud800", "\udc00", "\udfff"]),
                            st.text(max_size=5)).map("".join)
plain_words = st.text(min_size=1, max_size=12)
words = st.one_of(plain_words, plain_words, lone_surrogates)

# ---------------------------------------------------------------------------- bodies

MODELS = [BASE, "task", "plain", "sql", "sql@1", "sql@2", "sql@3", "soft", "soft@1", "nope", "task@1", ""]


def text_contents(text: st.SearchStrategy) -> st.SearchStrategy:
    """A message's content: a string, or an array of text parts."""
    parts = st.fixed_dictionaries({"type": st.just("text"), "text": text})
    return st.one_of(text, st.lists(parts, min_size=1, max_size=3))


good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(sorted(CHAT_ROLES)),
                                                "content": text_contents(plain_words)}), min_size=1, max_size=3)
contents = text_contents(words)
wild_parts = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": words}),
                       st.fixed_dictionaries({"type": json_values, "text": json_values}), json_values)
wild_messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(sorted(CHAT_ROLES)) | json_values,
                           "content": st.one_of(contents, st.lists(wild_parts, max_size=3), json_values)},
                          optional={"name": json_values, "tool_calls": json_values}),
    json_values), max_size=4)

# field -> (a value the server takes, and a wider strategy of values of the field's own kind)
FIELDS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "model": (st.sampled_from(MODELS[:3] + MODELS[4:6]), st.sampled_from(MODELS) | words),
    "max_tokens": (st.integers(1, 64), st.sampled_from(EDGE_INTS)),
    "max_completion_tokens": (st.integers(1, 64), st.sampled_from(EDGE_INTS)),
    "temperature": (st.floats(0, 2), st.sampled_from(EDGE_FLOATS + EDGE_INTS)),
    "top_p": (st.floats(0.125, 1), st.sampled_from(EDGE_FLOATS + EDGE_INTS)),
    "top_k": (st.integers(-1, 50), st.sampled_from(EDGE_INTS)),
    "seed": (st.integers(0, 2**63 - 1), st.sampled_from(EDGE_INTS)),
    "stop": (st.lists(plain_words, max_size=3) | plain_words,
             st.lists(st.sampled_from(EDGE_STRINGS) | words, max_size=18)),
    "n": (st.integers(1, 4), st.sampled_from(EDGE_INTS)),
    "best_of": (st.just(1), st.sampled_from(EDGE_INTS)),
    "ignore_eos": (st.booleans(), st.booleans()),
    "stream": (st.booleans(), st.booleans()),
    "stream_options": (st.just({"include_usage": True}), st.dictionaries(st.sampled_from(["include_usage", "x"]),
                                                                        json_values, max_size=2)),
    "presence_penalty": (st.just(0), st.sampled_from(EDGE_FLOATS + EDGE_INTS)),
    "frequency_penalty": (st.just(0.0), st.sampled_from(EDGE_FLOATS + EDGE_INTS)),
    "logit_bias": (st.just({}), st.dictionaries(st.text(max_size=4), json_values, max_size=2)),
    "user": (plain_words, json_values),
    "logprobs": (st.none(), st.sampled_from(EDGE_INTS) | st.booleans()),
    "top_logprobs": (st.none(), st.sampled_from(EDGE_INTS)),
    "echo": (st.booleans(), st.booleans()),
    "suffix": (st.none(), words),
    "tools": (st.just([]), st.lists(json_values, max_size=2)),
    "functions": (st.none(), st.lists(json_values, max_size=2)),
    "response_format": (st.just({"type": "text"}), st.dictionaries(st.sampled_from(["type", "json_schema"]),
                                                                   json_values, max_size=2)),
    "prompt": (plain_words | st.lists(plain_words, min_size=1, max_size=1),
               st.sampled_from(EDGE_STRINGS) | words | st.lists(words | json_values, max_size=3)),
    "messages": (good_messages, wild_messages),
}
COMPLETION_ONLY = {"prompt", "best_of", "echo", "suffix"}
CHAT_ONLY = {"messages", "max_completion_tokens", "tools", "functions", "response_format", "top_logprobs"}


@st.composite
def bodies(draw: st.DrawFn, chat: bool) -> dict:
    """A valid body with one field (or every field) set to any value of its kind or any JSON
    value, and maybe unknown fields."""
    own = [f for f in FIELDS if f not in (COMPLETION_ONLY if chat else CHAT_ONLY)]
    body: dict[str, Any] = {"model": draw(FIELDS["model"][0])}
    body["messages" if chat else "prompt"] = draw(FIELDS["messages" if chat else "prompt"][0])
    for name in draw(st.lists(st.sampled_from(own), max_size=3, unique=True)):  # more fields, still valid
        body[name] = draw(FIELDS[name][0])
    if "stream_options" in body:
        body["stream"] = True
    wild = own if draw(st.integers(0, 9)) == 0 else [draw(st.sampled_from(own))]
    for name in wild:
        body[name] = draw(st.one_of(FIELDS[name][1], FIELDS[name][1], json_values))
    if draw(st.integers(0, 4)) == 0:
        body.update(draw(st.dictionaries(st.text(max_size=8) | st.sampled_from(sorted(FIELDS)), json_values,
                                         max_size=3)))
    if draw(st.integers(0, 9)) == 0:
        body.pop(draw(st.sampled_from(sorted(body))))
    return body


@st.composite
def body_bytes(draw: st.DrawFn) -> tuple[bool, bytes]:
    """(chat?, a request body's bytes): a fuzzed body's JSON, as is or damaged."""
    chat = draw(st.booleans())
    text = json.dumps(draw(bodies(chat=chat))).encode()  # NaN and Infinity as Python's json writes them
    depth = draw(st.sampled_from([8, 63, 64, 65, 1000, 100_000]))
    digits = draw(st.sampled_from([20, 100, 101, 4300, 5000]))
    at = draw(st.integers(0, len(text)))
    damaged = {
        "deep": text[:-1] + b',"user":' + b"[" * depth + b"]" * depth + b"}",
        "long int": text[:-1] + b',"seed":' + b"7" * digits + b"}",
        "invalid utf-8": text[:at] + b"\xff" + text[at:], "cut": text[:at], "bom": b"\xef\xbb\xbf" + text,
        "not an object": b"[" + text + b"]",
    }
    how = draw(st.sampled_from(["as is", *damaged]))
    return chat, damaged.get(how, text)


# ---------------------------------------------------------------------------- the path


def fair_openai_refusal(exc: Exception) -> None:
    """As `fair_refusal`; and an OpenAIError's `param` (OpenAI's name for the field at fault) is None or a string."""
    fair_refusal(exc)
    if isinstance(exc, OpenAIError):
        assert exc.param is None or isinstance(exc.param, str)


def check_parsed(parsed: OpenAIRequest, chat: bool) -> None:
    """What parsing accepted has the types the rest of the path relies on."""
    call = parsed.call
    assert isinstance(parsed.model, str) and parsed.model and parsed.chat is chat
    assert isinstance(parsed.stream, bool) and isinstance(parsed.include_usage, bool)
    if chat:
        assert call.prompt is None and call.messages
        assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                   for m in call.messages)
    else:
        assert isinstance(call.prompt, str) and call.messages is None and isinstance(parsed.echo, str)
    kinds = {"max_new_tokens": int, "top_k": int, "seed": int, "n": int, "top_logprobs": int,
             "temperature": (int, float), "top_p": (int, float), "ignore_eos": bool, "logprobs": bool, "stop": list}
    for name, value in call.sampling.items():
        is_bool = isinstance(value, bool)
        assert value is None or (isinstance(value, kinds[name]) and (kinds[name] is bool or not is_bool))


def run_body(store: AdapterStore, engine, body: dict, chat: bool) -> None:
    """One body through the front's validation path, each step accepted or refused."""
    no, parsed = refused(lambda: (parse_chat if chat else parse_completion)(body), check=fair_openai_refusal)
    if no:
        return
    check_parsed(parsed, chat)
    no, target = refused(lambda: resolve_model(store, BASE, parsed.model), check=fair_openai_refusal)
    if no:
        return
    call = dataclasses.replace(parsed.call, **target)
    no, resolved = refused(lambda: resolve(call, store, DEFAULTS), check=fair_openai_refusal)
    if no:
        return
    refused(lambda: engine.encode(resolved.request), (RequestError, ValueError))  # as generation.generate maps it


@given(bodies(chat=False))
# Found by this test (minimal examples; each fails on the defect named):
# TypeError: a prompt holding a lone surrogate (JSON "\ud800") reaches the tokenizer, which raises
# TypeError (engine.encode -> intake; generation.generate catches only RequestError and ValueError)
@example({"model": BASE, "prompt": "\ud800"})
@fuzz(300)
def test_fuzz_completion_body_is_accepted_or_refused(fuzz_store, fuzz_engine, body: dict) -> None:
    run_body(fuzz_store, fuzz_engine, body, chat=False)


@given(bodies(chat=True))
# TypeError: unhashable type 'list', from `role not in CHAT_ROLES` (openai_schema._messages)
@example({"model": BASE, "messages": [{"role": [], "content": "0"}]})
# TypeError: as for the completion prompt, a chat content holding a lone surrogate
@example({"model": BASE, "messages": [{"role": "assistant", "content": "\ud800"}]})
@fuzz(300)
def test_fuzz_chat_body_is_accepted_or_refused(fuzz_store, fuzz_engine, body: dict) -> None:
    run_body(fuzz_store, fuzz_engine, body, chat=True)


@given(body_bytes())
# TypeError: the lone surrogate of the completion example, as the body's bytes spell it
@example((False, b'{"model": "tiny", "prompt": "\\ud800"}'))
@fuzz(200)
def test_fuzz_body_bytes_are_read_or_refused(fuzz_store, fuzz_engine, case: tuple[bool, bytes]) -> None:
    chat, raw = case
    try:
        with within(SECONDS_PER_INPUT):
            body = load_json(raw)
    except BODY_ERRORS:
        return
    if isinstance(body, dict):  # anything else is refused as not an object
        run_body(fuzz_store, fuzz_engine, body, chat)


@given(st.booleans(), st.sampled_from([BASE, "task", "sql@2"]))
@fuzz(10)
def test_fuzz_valid_bodies_are_accepted(fuzz_store, fuzz_engine, chat: bool, model: str) -> None:
    body = {"model": model, **({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})}
    parsed = (parse_chat if chat else parse_completion)(body)
    call = dataclasses.replace(parsed.call, **resolve_model(fuzz_store, BASE, model))
    assert fuzz_engine.encode(resolve(call, fuzz_store, DEFAULTS).request).prompt_token_ids
