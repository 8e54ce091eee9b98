"""The one error every adapter check raises, and the small value tests those checks share.

:class:`AdapterError` is defined here only, and every module that raises or catches it (the
validators :mod:`.adapters`, :mod:`.peft_config` and :mod:`.safetensors_file`, the engine, the
fronts) imports it from here, so ``except AdapterError`` catches a refusal from any of them.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["AdapterError", "SlotsExhausted", "AdapterQuarantined", "is_int", "is_finite_number", "short"]


class AdapterError(ValueError):
    """A clear, user-actionable message; never a traceback from deep inside."""


class SlotsExhausted(AdapterError):
    """No device slot can ever take another adapter (every slot is pinned)."""


class AdapterQuarantined(AdapterError):
    """An adapter or soft prompt that produced non-finite values (or was found absurd when read): it
    is refused until registered again. Fronts answer FAILED_PRECONDITION, not INVALID_ARGUMENT:
    the request was well formed, the adapter it names is not in a state to serve it."""

    status = "FAILED_PRECONDITION"


def is_int(value: Any) -> bool:
    """True for a real ``int``; ``bool`` does not count."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """True for an ``int`` or ``float`` that is neither a ``bool`` nor infinite nor NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def short(value: Any, limit: int = 80) -> str:
    """``value`` as it appears in an error message: JSON (strings repr'd), cut to ``limit`` characters."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
