"""Fuzzing GenerateRequest validation: the gRPC front's `inference_service.call_from_proto`, then
`generate_request.resolve`, the one validation path every front shares, against a real
registry (a LoRA with two versions, a soft prompt, two endpoints), then the engine's `encode`
(tokenizing, which `generation.generate` runs before queueing), and the wire itself
(`GenerateRequest.FromString`).

The properties: a decoded message maps onto a call without raising; `resolve` either accepts
it, and then the engine request it builds is within every bound (sampling values valid,
max_new_tokens under the cap, the prompt or chat under the server's size limits, exact versions
of the right kinds), or refuses it with an `ApiError` whose status is one a client can act on
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION), never another exception and never slowly;
`encode` then tokenizes it or raises `RequestError` / `ValueError` (INVALID_ARGUMENT).
Bytes off the wire either decode or raise `DecodeError` (which the server answers as
INVALID_ARGUMENT) and nothing else. Requests set every field: names valid, invalid and near
the 128-character limit, references with versions 0, 01, 2**60 and 19 digits, prompts and
chats just under and over the size limits, every optional sampling field at its type's limits
(NaN, inf, -1, 2**31-1, 2**64-1, ...); the bytes are valid messages mutated (truncated, bytes
flipped or inserted, invalid UTF-8 in a string) or random.

Runs are fixed (derandomized, no example database) so they cannot flake; a longer run is one
command, e.g.

    LORAPLEX_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/server/api/test_fuzz_generate_request.py -k fuzz
"""
from __future__ import annotations

import math
import random

from fuzzing import decoded, fuzz, refused, wire_bytes
from hypothesis import given
from hypothesis import strategies as st

from loraplex.adapters_store import AdapterStore
from loraplex.server.api.generate_request import Resolved, ServerDefaults, resolve
from loraplex.server.api.inference_service import call_from_proto
from loraplex.server.engine.intake import RequestError
from loraplex.server.engine.sampler import MAX_STOP_STRINGS
from loraplex.v1 import inference_pb2 as pb

DEFAULTS = ServerDefaults()
LIMIT = DEFAULTS.max_prompt_chars
TEMPLATE = "Q: {input}\nA:"  # fuzz_store's "task" endpoint (conftest.py): its template,
CAP = 64  # its max_new_tokens_cap,
TASK_MAX_NEW_TOKENS = 32  # and its default max_new_tokens


# ---------------------------------------------------------------------------- requests

INT32 = [-2**31, -1, 0, 1, 2, 16, 17, 20, 21, 64, 65, 256, 4096, 4097, 2**31 - 1]
UINT32 = [0, 1, 16, 17, 20, 21, 2**31, 2**32 - 1]
UINT64 = [0, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1]
FLOAT32 = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 1e-38, 0.5, 1.0, 1.0000001, 2.0, 3.4028235e38, -1.0]
REFS = ["", "task", "plain", "sql", "sql@1", "sql@2", "sql@3", "soft", "soft@1", "nope", "nope@1", "sql@0", "sql@01",
        "sql@-1", "sql@" + "9" * 18, "sql@" + "9" * 19, "sql@1@2", "@1", "a" * 128, "a" * 129, "-x", "x/y", "../x",
        "sql ", "SQL", "\x00", "é"]
# proto3 strings are Unicode, so the text strategies leave out surrogates (the wire test sends raw bytes)
texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)
words = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)
big_texts = st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1, 4 * LIMIT]).map(lambda n: "x" * n)
odd_texts = st.sampled_from(["", "{input}", "{", "}", "\x00", "\u202e", "\U0010ffff"])
# one_of picks each branch alike, so a branch listed three times is drawn three times as often
prompts = st.one_of(words, words, words, odd_texts, big_texts)
roles = st.one_of(st.sampled_from(["user", "system", "assistant"]), st.sampled_from(["user", "system", "assistant"]),
                  st.sampled_from(["developer", "tool", "", "USER"]), texts, big_texts)
many_messages = st.sampled_from([DEFAULTS.max_chat_messages, DEFAULTS.max_chat_messages + 1]).map(
    lambda n: [pb.ChatMessage(role="user", content="x")] * n)
messages = st.lists(st.builds(pb.ChatMessage, role=roles, content=prompts), min_size=1, max_size=5)
chats = st.one_of(messages, messages, messages, messages, st.just([]), many_messages)
GOOD_REFS = {"endpoint": ["task", "plain"], "adapter": ["sql", "sql@1", "sql@2"], "soft_prompt": ["soft", "soft@1"]}


def names(field: str) -> st.SearchStrategy:
    """A name for `field`: mostly one the registry holds for it, else any of REFS or any text."""
    good = st.sampled_from(GOOD_REFS[field])
    return st.one_of(good, good, st.sampled_from(REFS), texts)


def optional(valid: st.SearchStrategy, edges: list, full: st.SearchStrategy) -> tuple[st.SearchStrategy, ...]:
    """(valid, wild) for an optional field: absent or a value the server takes; or also one at
    the type's limits, or any value of the type."""
    taken = st.none() | valid
    return taken, st.one_of(taken, st.sampled_from(edges), full)


INT32_ANY, FLOAT32_ANY = st.integers(-2**31, 2**31 - 1), st.floats(width=32)
SAMPLING = {
    "max_new_tokens": optional(st.integers(1, CAP), INT32, INT32_ANY),
    "temperature": optional(st.floats(0, 2, width=32), FLOAT32, FLOAT32_ANY),
    "top_p": optional(st.floats(0.125, 1, width=32), FLOAT32, FLOAT32_ANY),
    "top_k": optional(st.integers(0, 50), INT32, INT32_ANY),
    "seed": optional(st.integers(0, 2**63 - 1), UINT64, st.integers(0, 2**64 - 1)),
    "ignore_eos": (st.none() | st.booleans(),) * 2,
    "n": optional(st.integers(1, 16), UINT32, st.integers(0, 2**32 - 1)),
    "logprobs": (st.just(True), st.none() | st.booleans()),  # top_logprobs needs it
    "top_logprobs": optional(st.integers(0, 20), UINT32, st.integers(0, 2**32 - 1)),
    "stop": (st.lists(words, max_size=3),
             st.lists(st.one_of(words, words, words, odd_texts, big_texts), max_size=MAX_STOP_STRINGS + 2)),
}
TARGETS = {"none": (), "endpoint": ("endpoint",), "adapter": ("adapter",), "soft": ("soft_prompt",),
           "both": ("adapter", "soft_prompt")}
good_chats = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant"]), content=words),
                      min_size=1, max_size=3)
ASPECTS = ["target", "input", "request_id", *SAMPLING]


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """A request the server takes with one aspect (what it applies, its input, its id or one
    sampling field) drawn from everything its type allows; or with every aspect wild at once."""
    wild = set(ASPECTS) if draw(st.integers(0, 3)) == 0 else {draw(st.sampled_from(ASPECTS))}
    if "target" in wild:
        fields = draw(st.sampled_from([*TARGETS.values(), ("endpoint", "adapter", "soft_prompt")]))
        named = {f: draw(names(f)) for f in fields}
    else:
        fields = draw(st.sampled_from(list(TARGETS.values())))
        named = {f: draw(st.sampled_from(GOOD_REFS[f])) for f in fields}
    request_id = draw(st.one_of(st.just(""), texts, big_texts) if "request_id" in wild else st.just(""))
    req = pb.GenerateRequest(request_id=request_id, **named)
    which = draw(st.sampled_from(["prompt", "chat", "none"] if "input" in wild else ["prompt", "chat"]))
    if which == "prompt":
        req.prompt = draw(prompts if "input" in wild else words)
    elif which == "chat":
        req.chat.CopyFrom(pb.Chat(messages=draw(chats if "input" in wild else good_chats)))
    sampling = {k: draw(pair[1] if k in wild else pair[0]) for k, pair in SAMPLING.items()}
    if not sampling["logprobs"] and "top_logprobs" not in wild:
        sampling["top_logprobs"] = None
    req.sampling.CopyFrom(pb.SamplingParameters(**{k: v for k, v in sampling.items() if v is not None}))
    return req


BAD_PROMPT = b"\x22\x02\xff\xfe"  # for wire_bytes to splice in: field 4 (prompt), 2 bytes that are not UTF-8


# ---------------------------------------------------------------------------- the path


def resolve_and_encode(store: AdapterStore, engine, req: pb.GenerateRequest) -> Resolved | None:
    """`resolve_or_refuse`, then the engine's tokenizing of what it accepted (a refusal there is
    RequestError or ValueError, which generation.generate answers as INVALID_ARGUMENT)."""
    resolved = resolve_or_refuse(store, req)
    if resolved is not None:
        no, encoded = refused(lambda: engine.encode(resolved.request), (RequestError, ValueError))
        assert no or encoded.prompt_token_ids
    return resolved


def resolve_or_refuse(store: AdapterStore, req: pb.GenerateRequest) -> Resolved | None:
    """The resolved request, checked against every bound; None for a refusal with a fair status."""
    call = call_from_proto(req)  # a plain mapping of a decoded message: it has nothing to refuse
    no, resolved = refused(lambda: resolve(call, store, DEFAULTS, random.Random(0)))
    if no:
        return None
    request, params = resolved.request, resolved.request.params
    params.validate()
    endpoint = call.endpoint == "task"
    assert 1 <= params.max_new_tokens <= (CAP if endpoint else DEFAULTS.max_new_tokens_limit)
    assert len(params.stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in params.stop)
    assert (request.prompt is None) != (request.messages is None)
    if call.prompt is not None:
        assert 0 < len(call.prompt) <= LIMIT
    else:
        assert 0 < len(call.messages) <= DEFAULTS.max_chat_messages
        assert sum(len(m["role"]) + len(m["content"]) for m in call.messages) <= LIMIT
        assert all(m["role"] for m in call.messages)
    assert resolved.adapter in (("sql@1", "sql@2") if endpoint else ("", "sql@1", "sql@2"))
    assert resolved.soft_prompt in ("", "soft@1")
    assert resolved.endpoint == call.endpoint
    return resolved


@given(generate_requests())
@fuzz(400)
def test_fuzz_generate_request_is_resolved_or_refused(fuzz_store, fuzz_engine, req: pb.GenerateRequest) -> None:
    resolve_and_encode(fuzz_store, fuzz_engine, req)


@given(st.sampled_from(["task", "plain", ""]), st.sampled_from(["hi", "x" * LIMIT]))
@fuzz(20)
def test_fuzz_valid_requests_are_resolved(fuzz_store, endpoint: str, prompt: str) -> None:
    resolved = resolve_or_refuse(fuzz_store, pb.GenerateRequest(endpoint=endpoint, prompt=prompt))
    assert resolved is not None
    if endpoint == "task":
        assert resolved.request.prompt == TEMPLATE.format(input=prompt) and resolved.soft_prompt == "soft@1"
        params = resolved.request.params
        assert params.max_new_tokens == TASK_MAX_NEW_TOKENS and params.temperature == 0.5


@given(wire_bytes(generate_requests(), BAD_PROMPT))
@fuzz(300)
def test_fuzz_generate_request_bytes_decode_or_raise_decode_error(fuzz_store, fuzz_engine, data: bytes) -> None:
    if (req := decoded(pb.GenerateRequest, data)) is not None:
        resolve_and_encode(fuzz_store, fuzz_engine, req)
