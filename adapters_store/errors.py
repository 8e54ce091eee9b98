"""The one exception type the store raises for a caller's mistake.

``code`` is one of :data:`CODES`; the server maps it onto a gRPC status (``invalid`` ->
INVALID_ARGUMENT, ``not_found`` -> NOT_FOUND, ``already_exists`` -> ALREADY_EXISTS,
``failed_precondition`` -> FAILED_PRECONDITION, ``unavailable`` -> UNAVAILABLE: the shared
registry database cannot be reached). The message is meant for the operator as is.
"""

from __future__ import annotations

CODES = frozenset({"invalid", "not_found", "already_exists", "failed_precondition", "unavailable"})


class StoreError(Exception):
    """A refused store operation; ``code`` says which kind, the message says exactly why."""

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown StoreError code {code!r}; expected one of {sorted(CODES)}")
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"StoreError({self.code!r}, {self.message!r})"
