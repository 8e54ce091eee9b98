"""JSON from untrusted bytes, bounded: nesting depth and integer size are refused before
``json.loads`` can fail in a way of its own.

Three documents loraplex parses come from whoever calls it: an adapter's ``adapter_config.json``,
a safetensors header, and an OpenAI request body. ``json.loads`` recurses once per level of arrays
and objects, so a document 100,000 deep raised RecursionError out of the validators (at a depth
that depends on the interpreter's recursion limit and the caller's stack); and it turns an integer
of more than 4,300 digits into a bare ValueError. :func:`load_json` counts the depth first and
bounds integers, and refuses with :class:`JSONLimitError`, whose message each caller completes.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

# Levels of arrays and objects inside one another a JSON document may hold (a PEFT config needs
# about 3, a safetensors header 3, an OpenAI request body 4). json.loads recurses once per level:
# a document 100,000 deep raised RecursionError out of the validators, at a depth that depends on
# the interpreter's recursion limit and the caller's stack, so the depth is counted first.
MAX_JSON_DEPTH = 64
# Digits in one JSON integer (a uint64 has 20). Past Python's own limit (4,300) json.loads raised a
# bare ValueError, and an error message quoting a huge integer raised one of its own.
MAX_JSON_INT_DIGITS = 100


class JSONLimitError(ValueError):
    """A JSON document past one of :func:`load_json`'s limits; the message completes "<the document> ..."."""


def load_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)``, refusing (:class:`JSONLimitError`) more than ``max_depth`` levels of
    arrays and objects before json.loads, which recurses once per level, ever sees them, and any
    integer of more than :data:`MAX_JSON_INT_DIGITS` digits."""
    too_deep = JSONLimitError(f"is nested deeper than {max_depth} levels (the limit)")
    if _nested_deeper_than(text.encode("utf-8") if isinstance(text, str) else text, max_depth):
        raise too_deep
    try:
        return json.loads(text, parse_int=_bounded_int)
    except RecursionError:  # a caller already near the interpreter's limit
        raise too_deep from None


def _bounded_int(digits: str) -> int:
    if len(digits) > MAX_JSON_INT_DIGITS + 1:  # a sign, then the digits
        raise JSONLimitError(f"holds an integer of {len(digits.lstrip('-'))} digits (the limit is "
                             f"{MAX_JSON_INT_DIGITS})")
    return int(digits)


# +1 for an opening bracket, -1 for a closing one, 0 for any other byte
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_SCAN_CHUNK = 1 << 20


def _nested_deeper_than(text: bytes, limit: int) -> bool:
    """Whether the brackets of the JSON ``text`` outside its strings nest more than ``limit`` deep.

    Escaped backslashes and quotes are dropped first, so every quote left opens or closes a string
    and a byte is outside strings when an even number of quotes precede it; then a running sum of
    the brackets' steps, 1 MiB at a time, all in numpy: linear, whatever the text (a regex
    skipping strings cost 0.7 us per string, 25 s for 100 MB of them)."""
    if text.count(b"[") + text.count(b"{") <= limit:
        return False
    plain = np.frombuffer(text.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    depth = quotes = 0
    for start in range(0, len(plain), _SCAN_CHUNK):
        chunk = plain[start : start + _SCAN_CHUNK]
        is_quote = chunk == ord('"')
        outside = (np.cumsum(is_quote, dtype=np.int64) + quotes) % 2 == 0
        running = np.cumsum(_STEP[chunk] * outside, dtype=np.int64) + depth
        if running.max() > limit:
            return True
        depth, quotes = int(running[-1]), quotes + int(is_quote.sum())
    return False
