"""What a registry row may hold: bounded metadata, and registration idempotency keys.

Why bounds: a 15 MB string inside an adapter's config (under the 16 MB file limit) was stored in
its row, twice (as the base model and inside a warning), and every Admin response carrying that
row then went over gRPC's message limit: Register, Get and Delete answered RESOURCE_EXHAUSTED
although the change had committed, and ListAdapters failed for every caller until the adapter was
deleted. The validator now refuses oversized config values itself; this module is the store's own
last line, so no row can ever carry more than :data:`MAX_METADATA_CHARS` of metadata whatever the
validator returns.
"""
from __future__ import annotations

import json
import re
from typing import Any

from .errors import StoreError
from .records import KINDS

# A version's metadata: the validator's summary (ranks, warnings, base model name, the trainer's
# template of at most 64 KiB). Real adapters carry a few hundred characters.
MAX_METADATA_CHARS = 128 * 1024
IDEMPOTENCY_SECONDS = 24 * 3600  # how long a registration's idempotency key is remembered
MAX_IDEMPOTENCY_KEY = 128
_IDEMPOTENCY_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY}}}")


def checked_metadata(metadata: Any) -> dict:
    """The validation callback's result must be a JSON-serialisable dict naming a known kind."""
    if not isinstance(metadata, dict):
        raise TypeError(f"the validate callback must return a dict, got {type(metadata).__name__}")
    if metadata.get("kind") not in KINDS:
        raise TypeError(
            f"the validate callback must return metadata with 'kind' in {KINDS}, got {metadata.get('kind')!r}"
        )
    try:
        text = json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the validate callback returned metadata that is not JSON-serialisable: {exc}") from None
    if len(text) > MAX_METADATA_CHARS:
        largest = max(metadata, key=lambda k: len(json.dumps(metadata[k])))
        raise StoreError("invalid", f"the adapter's metadata is {len(text)} characters, over the limit of "
                                    f"{MAX_METADATA_CHARS}; its largest field is {largest!r} "
                                    f"({len(json.dumps(metadata[largest]))} characters)")
    return json.loads(text)


def check_idempotency_key(key: str) -> str:
    """An idempotency key is 1 to 128 printable ASCII characters (no spaces)."""
    if not isinstance(key, str) or not _IDEMPOTENCY_KEY.fullmatch(key):
        shown = short_text(key) if isinstance(key, str) else type(key).__name__
        raise StoreError("invalid", f"invalid idempotency key {shown}: use 1 to {MAX_IDEMPOTENCY_KEY} printable "
                                    "ASCII characters without spaces (a UUID does)")
    return key


def short_text(text: str, limit: int = 64) -> str:
    """``text`` as an error message quotes it: repr'd, cut to ``limit`` characters."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"
