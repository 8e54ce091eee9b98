"""The regexes an adapter config names modules with (``target_modules`` as a string, the keys of
``rank_pattern`` and ``alpha_pattern``), compiled and matched within a time bound.

PEFT matches them with ``re``, which has no timeout: ``(.|.)*z`` against one 31-character module
name backtracks for minutes inside C, beyond the reach of any signal, on the thread that serves
registrations. The `regex` package reads the same syntax and stops a match at a timeout, so a
hostile pattern costs at most :data:`MATCH_SECONDS` and is refused by name. Matching rules are
PEFT's: ``target_modules`` must match a module's whole name; a pattern key ``k`` applies where
``(.*\\.)?(k)$`` matches from the name's start (``get_pattern_key``).
"""

from __future__ import annotations

import functools
import time

import regex

from .adapter_errors import AdapterError, short

__all__ = ["MATCH_SECONDS", "compile_regex", "pattern_key_regex", "matching"]

MATCH_SECONDS = 1.0  # one pattern against every module name of the model


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> regex.Pattern:
    return regex.compile(source)


def compile_regex(source: str, what: str, where: str) -> regex.Pattern:
    """``source`` compiled, or an AdapterError naming `what` (say "target_modules")."""
    try:
        return _compiled(source)
    except (regex.error, OverflowError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, regex.error) else "it nests or repeats too deeply"
        raise AdapterError(f"{where}: {what} is not a valid regex: {short(reason)}") from None


def pattern_key_regex(key: str, what: str, where: str) -> regex.Pattern:
    """The regex PEFT builds from a ``rank_pattern`` / ``alpha_pattern`` key."""
    return compile_regex(rf"(.*\.)?({key})$", what, where)


def matching(pattern: regex.Pattern, names: list[str], whole: bool, what: str, where: str) -> list[bool]:
    """Whether ``pattern`` matches each of ``names`` (the whole name, or from its start), within
    :data:`MATCH_SECONDS` for all of them together."""
    deadline = time.monotonic() + MATCH_SECONDS
    match = pattern.fullmatch if whole else pattern.match
    try:
        return [match(name, timeout=max(deadline - time.monotonic(), 1e-3)) is not None for name in names]
    except TimeoutError:
        raise AdapterError(f"{where}: {what} is a regex that takes over {MATCH_SECONDS} s to match the model's "
                           "module names; write it without nested repetition") from None
