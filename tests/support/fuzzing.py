"""What the Hypothesis fuzz tests share (tests/server/engine/test_fuzz_*.py, tests/server/api/test_fuzz_*.py
and kserve_tensors_fuzz.py): their fixed settings, a per-input time limit, the refusals a bad request
may get, JSON values (and text Python's json cannot write), and a message's wire bytes, mutated and decoded.

On sys.path through pyproject's `pythonpath`, so a test file imports it as `fuzzing`. It must not
import loraplex.v1.kserve_v2_pb2 (see kserve_tensors_fuzz.py).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from loraplex.server.api.generate_request import ApiError

T = TypeVar("T")
M = TypeVar("M", bound=Message)

SECONDS_PER_INPUT = 2.0  # an input is checked in milliseconds; this catches work that grows out of bounds
REFUSALS = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"}  # what a bad request may be told


def fuzz(examples: int) -> settings:
    """The suite's fixed settings; LORAPLEX_FUZZ_EXAMPLES overrides the number of examples."""
    return settings(deadline=None, derandomize=True, database=None,
                    max_examples=int(os.environ.get("LORAPLEX_FUZZ_EXAMPLES") or examples),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class TooSlow(Exception):
    """An input the code under test did not finish with in SECONDS_PER_INPUT."""


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Raise TooSlow if the body takes over `seconds`: interrupted at that time where Python code
    (or the regex engine, which checks for signals) runs, main thread only; or afterwards where one
    C call (a huge math.prod) held on."""
    def expire(signum: int, frame: Any) -> None:
        raise TooSlow(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if time.monotonic() - start > seconds:
        raise TooSlow(f"took {time.monotonic() - start:.1f} s, over {seconds} s")


# ---------------------------------------------------------------------------- refusals


def fair_refusal(exc: Exception) -> None:
    """An ApiError must carry a client's status and say why; other refusals are taken as they are."""
    if isinstance(exc, ApiError):
        assert exc.code in REFUSALS and exc.message, f"{exc.code}: {exc.message}"


def refused(step: Callable[[], T], errors: tuple[type[Exception], ...] = (ApiError,),
            check: Callable[[Exception], None] = fair_refusal) -> tuple[bool, T | None]:
    """(False, step's result), or (True, None) where `step` raised one of `errors`, which `check`
    then asserts is a fair refusal; any other exception, or a step over SECONDS_PER_INPUT, fails the test."""
    try:
        with within(SECONDS_PER_INPUT):
            return False, step()
    except errors as exc:
        check(exc)
        return True, None


# ---------------------------------------------------------------------------- JSON text


def any_json(edge_ints: list[int], edge_floats: list[float], edge_strings: list[str],
             *more: st.SearchStrategy, max_leaves: int) -> st.SearchStrategy:
    """Any JSON value: scalars of every type, the given numbers and strings at the limits and `more`
    among them, nested in lists and objects."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(edge_ints), st.floats(),
                        st.sampled_from(edge_floats), st.text(max_size=12), st.sampled_from(edge_strings), *more)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=max_leaves)


@dataclass(frozen=True)
class Raw:
    """JSON text written as is: what json.dumps cannot produce (a 5,000-digit integer, 1e999)."""

    text: str


@contextmanager
def long_ints() -> Iterator[None]:
    """Let the test itself write integers over Python's 4,300-digit limit (the code under test
    always runs with the limit as it is)."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(limit)


def dump(value: Any) -> str:
    """JSON text for `value`, Raw tokens verbatim (NaN and infinities as Python's json writes them)."""
    with long_ints():
        return _dump(value)


def _dump(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    return json.dumps(value)


# ---------------------------------------------------------------------------- wire bytes


def mutated(draw: st.DrawFn, data: bytes, bad_utf8: bytes) -> bytes:
    """A message's bytes as they are or with up to two mutations: a byte flipped, the rest cut,
    random bytes inserted, or `bad_utf8` inserted (a string field, tag and length, whose bytes
    are not UTF-8)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(out)))
        op = draw(st.sampled_from(["flip", "cut", "insert", "invalid utf-8"]))
        if op == "flip" and at < len(out):
            out[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "invalid utf-8":
            out[at:at] = bad_utf8
    return bytes(out)


@st.composite
def wire_bytes(draw: st.DrawFn, messages: st.SearchStrategy[Message], bad_utf8: bytes) -> bytes:
    """A message's bytes, as they are or `mutated`; or random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=64))
    return mutated(draw, draw(messages).SerializeToString(), bad_utf8)


def decoded(message_type: type[M], data: bytes) -> M | None:
    """The message `data` spells, or None where it raises DecodeError (which a server answers as
    INVALID_ARGUMENT); any other exception fails the test."""
    try:
        return message_type.FromString(data)
    except DecodeError:
        return None
