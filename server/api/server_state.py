"""What the gRPC services share: the engine loop, the registry, metrics, limits."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from loraplex.adapters_store.store import AdapterStore

from .engine_loop import EngineLoop
from .generate_request import ServerDefaults
from .metrics import Metrics


@dataclass
class ServerState:
    engine_loop: EngineLoop
    store: AdapterStore
    metrics: Metrics
    defaults: ServerDefaults
    model_name: str
    draining: bool = False  # SIGTERM received: refuse new requests, finish the running ones
    # registry refs (name@version) this replica cannot serve on its base model -> why (registry_sync)
    unservable: dict[str, str] = field(default_factory=dict)
    # of those, when a request may next retry registering one (time.monotonic()), and the retry
    # running now (registry_sync.retry_unservable)
    retry_after: dict[str, float] = field(default_factory=dict)
    retrying: dict[str, asyncio.Future] = field(default_factory=dict)

    def not_servable(self, ref: str) -> str:
        """What to say of `ref`, registered but not servable here: the reason, when it is known."""
        why = self.unservable.get(ref)
        return "registered but not servable on the served base model" + (f": {why}" if why else "")
