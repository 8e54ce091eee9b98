"""What the store hands out: registered adapter versions and endpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .names import format_ref

KINDS = ("lora", "soft_prompt")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


@dataclass(frozen=True)
class AdapterRecord:
    """One immutable registered version of an adapter.

    ``metadata`` is what the server's validation callback returned (ranks, warnings, ...);
    ``blob_dir`` is the content-addressed directory holding its files, shared by every
    version with the same ``digest``. Treat both as read-only.
    """

    name: str
    version: int
    kind: str
    digest: str
    size_bytes: int
    created_at: float
    metadata: dict[str, Any]
    blob_dir: Path

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.version)


@dataclass
class EndpointRecord:
    """A task name bound to adapter versions, a template and default sampling parameters.

    On the way in, ``adapter``, ``soft_prompt`` and ``canary_adapter`` may be ``"name"`` (the
    latest version at save time) or ``"name@version"``; records the store returns always
    hold the exact ``"name@version"``. ``canary_weight`` is the fraction of requests served
    by ``canary_adapter`` instead of ``adapter``. ``created_at``/``updated_at`` are set by
    the store.
    """

    name: str
    adapter: str | None = None
    soft_prompt: str | None = None
    template: str = ""
    system_message: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    max_new_tokens_cap: int | None = None
    canary_adapter: str | None = None
    canary_weight: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
