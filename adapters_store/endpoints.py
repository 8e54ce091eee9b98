"""Checks on an endpoint's own fields: name, template, system message, defaults, cap, canary.

Resolving the adapter references needs the registry and happens in the store; everything
here is pure.

Template rule: a template is a :meth:`str.format` string whose only replacement field is
``{input}``, used exactly once, with no conversion or format spec. Literal braces are written
``{{`` and ``}}``, as in ``str.format``; any other brace is refused. So rendering is plain
``template.format(input=text)`` (see :func:`render_template`) and the text itself may hold any
braces. An empty template means "the input as is".
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real
from string import Formatter
from typing import Any

from .errors import StoreError
from .names import parse_ref, validate_name
from .records import SAMPLING_FIELDS, EndpointRecord

MAX_TEXT_CHARS = 64 * 1024
MAX_STOP_STRINGS = 16
SEED_LIMIT = 2**63
INPUT_SLOT = "{input}"


def render_template(template: str, text: str) -> str:
    """The prompt an endpoint's template makes of ``text`` (``text`` itself when empty)."""
    return template.format(input=text) if template else text


def check_endpoint(rec: EndpointRecord) -> EndpointRecord:
    """A copy of ``rec`` with every field checked and normalised; refs are syntax-checked only."""
    if not isinstance(rec, EndpointRecord):
        raise TypeError(f"expected an EndpointRecord, got {type(rec).__name__}")
    validate_name(rec.name, "endpoint")
    refs = ((rec.adapter, "adapter"), (rec.soft_prompt, "soft prompt"), (rec.canary_adapter, "canary adapter"))
    for ref, what in refs:
        if ref is not None:
            parse_ref(ref, what)
    check_template(rec.template)
    _check_text("system_message", rec.system_message)
    defaults = check_defaults(rec.defaults)
    cap = _check_cap(rec.max_new_tokens_cap)
    if cap is not None and defaults.get("max_new_tokens", 0) > cap:
        raise StoreError(
            "invalid",
            f"endpoint {rec.name!r}: defaults.max_new_tokens {defaults['max_new_tokens']} exceeds "
            f"max_new_tokens_cap {cap}",
        )
    weight = _check_canary(rec)
    return dataclasses.replace(rec, defaults=defaults, max_new_tokens_cap=cap, canary_weight=weight)


def check_template(template: str) -> None:
    """Refuse a template that breaks the rule in this module's docstring."""
    _check_text("template", template)
    if not template:
        return
    try:
        parts = list(Formatter().parse(template))
    except ValueError as exc:
        raise StoreError(
            "invalid", f"template has an unmatched brace ({exc}); write literal braces as '{{{{' and '}}}}'"
        ) from None
    slots = 0
    for _, field_name, spec, conversion in parts:
        if field_name is None:
            continue
        if field_name != "input" or spec or conversion:
            shown = "{" + field_name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise StoreError(
                "invalid",
                f"template has the field {shown!r}; the only field allowed is {INPUT_SLOT} "
                "(write literal braces as '{{' and '}}')",
            )
        slots += 1
    if slots != 1:
        raise StoreError("invalid", f"template must contain exactly one {INPUT_SLOT} slot, found {slots}")


def check_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """A normalised copy of default sampling parameters (``None`` values mean "unset" and go)."""
    if not isinstance(defaults, dict):
        raise StoreError("invalid", f"defaults must be a mapping, got {type(defaults).__name__}")
    unknown = sorted(str(k) for k in defaults if k not in SAMPLING_FIELDS)
    if unknown:
        raise StoreError(
            "invalid", f"unknown default sampling field(s) {unknown}; allowed: {', '.join(SAMPLING_FIELDS)}"
        )
    out: dict[str, Any] = {}
    for key in SAMPLING_FIELDS:
        value = defaults.get(key)
        if value is not None:
            out[key] = _CHECKS[key](value)
    return out


def _check_text(what: str, value: str) -> None:
    if not isinstance(value, str):
        raise StoreError("invalid", f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise StoreError("invalid", f"{what} is {len(value)} characters long; the limit is {MAX_TEXT_CHARS}")


def _check_cap(cap: int | None) -> int | None:
    if cap is None:
        return None
    return _int_at_least("max_new_tokens_cap", cap, 1)


def _check_canary(rec: EndpointRecord) -> float:
    weight = _real("canary_weight", rec.canary_weight)
    if rec.canary_adapter is None:
        if weight != 0:
            raise StoreError("invalid", f"canary_weight is {weight} but no canary_adapter is set")
        return 0.0
    if rec.adapter is None:
        raise StoreError("invalid", "a canary needs an adapter to split traffic with; set adapter too")
    if not 0 < weight < 1:
        raise StoreError("invalid", f"canary_weight must be strictly between 0 and 1, got {weight}")
    return weight


def _int_at_least(what: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreError("invalid", f"{what} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise StoreError("invalid", f"{what} must be {bound}, got {value}")
    return int(value)


def _real(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise StoreError("invalid", f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise StoreError("invalid", f"{what} must be finite, got {value}")
    return float(value)


def _temperature(value: Any) -> float:
    value = _real("defaults.temperature", value)
    if value < 0:
        raise StoreError("invalid", f"defaults.temperature must be >= 0 (0 = greedy), got {value}")
    return value


def _top_p(value: Any) -> float:
    value = _real("defaults.top_p", value)
    if not 0 < value <= 1:
        raise StoreError("invalid", f"defaults.top_p must be in (0, 1], got {value}")
    return value


def _stop(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise StoreError("invalid", f"defaults.stop must be a list of strings, got {type(value).__name__}")
    if len(value) > MAX_STOP_STRINGS:
        raise StoreError("invalid", f"defaults.stop holds {len(value)} strings; the limit is {MAX_STOP_STRINGS}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise StoreError("invalid", f"defaults.stop[{i}] must be a non-empty string, got {item!r}")
    return list(value)


def _ignore_eos(value: Any) -> bool:
    if not isinstance(value, bool):
        raise StoreError("invalid", f"defaults.ignore_eos must be a bool, got {type(value).__name__}")
    return value


_CHECKS = {
    "max_new_tokens": lambda v: _int_at_least("defaults.max_new_tokens", v, 1),
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": lambda v: _int_at_least("defaults.top_k", v, 0),
    "seed": lambda v: _int_at_least("defaults.seed", v, 0, SEED_LIMIT),
    "stop": _stop,
    "ignore_eos": _ignore_eos,
}
