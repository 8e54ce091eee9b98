"""Turns the engine's state into metric values (runs on the engine thread).

It only reads: `Engine.stats()` for every counter and gauge (counters are reported as the growth
since the last snapshot), and `Engine.events(cursor)` for each adapter load's duration, with a
cursor of its own, so another observer of the same engine takes nothing from it.
"""
from __future__ import annotations

import logging

from loraplex.server.engine.engine_stats import ADAPTER_LOAD, EngineStats

from .metrics import Metrics

log = logging.getLogger(__name__)

# the EngineStats counters, each feeding the Metrics counter of the same name
COUNTERS = ("adapter_loads", "adapter_evictions", "adapter_hits", "adapter_misses", "adapter_load_failures",
            "merge_switches", "reused_prompt_tokens")


class MetricsHook:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._seen = dict.fromkeys(COUNTERS, 0)
        self._cursor = 0  # of the engine's event log
        self.missed_events = 0  # events that left the engine's log before they were read

    def step(self, loop, step_seconds: float, num_outputs: int) -> None:
        """After each engine step: its duration and size, then every gauge."""
        self.metrics.step_seconds.observe(step_seconds)
        self.metrics.batch_size.observe(num_outputs)
        self.gauges(loop)

    def gauges(self, loop) -> None:
        """Queue, batch, KV and adapter state now (also after requests leave without a step)."""
        m = self.metrics
        stats = loop.engine.stats()
        m.queue_depth.set(loop.num_waiting())
        m.running.set(stats.running)
        m.kv_usage.set(stats.kv_usage)
        self._count(stats)
        self._observe_events(loop.engine)
        m.resident.set(len(stats.resident_adapters))
        running = _addressable(set(stats.running_adapters))
        waiting = _addressable(set(stats.waiting_adapters))
        m.set_lora_info(sorted(running), sorted(waiting - running), stats.max_loras)

    def _count(self, stats: EngineStats) -> None:
        """Each counter grows by what the engine's grew since the last snapshot."""
        for name in COUNTERS:
            value = getattr(stats, name)
            if value > self._seen[name]:
                getattr(self.metrics, name).inc(value - self._seen[name])
            self._seen[name] = value

    def _observe_events(self, engine) -> None:
        page = engine.events(self._cursor)
        self._cursor = page.cursor
        if page.missed:
            self.missed_events += page.missed
            log.warning("%d engine events were dropped before the metrics read them (%d in all): "
                        "loraplex_adapter_load_seconds is missing their samples", page.missed, self.missed_events)
        for event in page.events:
            if event.kind == ADAPTER_LOAD:
                self.metrics.adapter_load_seconds.observe(event.seconds)


def _addressable(refs: set[str]) -> set[str]:
    """Each engine ref ("sum@2") under both names a request may use ("sum@2" and "sum"), so an
    adapter-affinity router that compares the request's `model` with these labels finds it."""
    return refs | {ref.partition("@")[0] for ref in refs}
