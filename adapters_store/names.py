"""Names of adapters, endpoints and stored files, and ``name@version`` references.

One rule for all three: an ASCII letter or digit, then up to 127 letters, digits, ``.``, ``_``
or ``-``. So a name is never empty, ``.``, ``..``, a path, a hidden file or an option
(leading ``-``), and ``@`` stays free to separate a version.
"""

from __future__ import annotations

import re

from .errors import StoreError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
MAX_NAME_LENGTH = 128

_NAME = re.compile(NAME_PATTERN)
_NAME_CHAR = re.compile(r"[A-Za-z0-9._-]")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")


def validate_name(name: str, what: str = "adapter") -> str:
    """Return ``name`` unchanged, or raise ``StoreError("invalid")`` naming the rule it breaks."""
    if not isinstance(name, str):
        raise StoreError("invalid", f"{what} name must be a string, got {type(name).__name__}")
    if _NAME.fullmatch(name):
        return name
    if not name:
        reason = "must not be empty"
    elif len(name) > MAX_NAME_LENGTH:
        reason = f"is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
    elif not _NAME_CHAR.fullmatch(name[0]) or name[0] in "._-":
        reason = f"starts with {name[0]!r}; it must start with an ASCII letter or digit"
    else:
        bad = next(c for c in name if not _NAME_CHAR.fullmatch(c))
        reason = f"contains {bad!r}; only ASCII letters, digits, '.', '_' and '-' are allowed"
    raise StoreError("invalid", f"invalid {what} name {_shown(name)}: {reason} (pattern {NAME_PATTERN})")


def validate_file_name(name: str) -> str:
    """A file inside an adapter follows the name rule too: no ``/``, no ``..``, no leading ``.``."""
    return validate_name(name, "file")


def parse_ref(ref: str, what: str = "adapter") -> tuple[str, int | None]:
    """``"name"`` -> ``(name, None)``; ``"name@3"`` -> ``(name, 3)``.

    A version is a positive decimal integer written without sign or leading zeros, so every
    reference has exactly one spelling.
    """
    if not isinstance(ref, str):
        raise StoreError("invalid", f"{what} reference must be a string, got {type(ref).__name__}")
    name, at, version = ref.partition("@")
    validate_name(name, what)
    if not at:
        return name, None
    if not _VERSION.fullmatch(version):
        raise StoreError(
            "invalid",
            f"invalid {what} reference {_shown(ref)}: the version after '@' must be a positive integer "
            "without sign or leading zeros (e.g. name@3)",
        )
    return name, int(version)


def format_ref(name: str, version: int) -> str:
    """The canonical ``name@version`` spelling."""
    return f"{name}@{version}"


def _shown(text: str, limit: int = MAX_NAME_LENGTH + 8) -> str:
    """A refused name as its error quotes it: repr'd, cut to about a valid name's length (a
    10,000-character name is not echoed whole)."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(text)} characters)"
