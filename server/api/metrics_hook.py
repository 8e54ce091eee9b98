"""Turns the engine's state into metric values (runs on the engine thread)."""
from __future__ import annotations

from .metrics import Metrics


class MetricsHook:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._seen = {"loads": 0, "evictions": 0, "hits": 0, "misses": 0, "load_failures": 0, "merge_switches": 0,
                      "reused_tokens": 0}

    def step(self, loop, step_seconds: float, num_outputs: int) -> None:
        """After each engine step: its duration and size, then every gauge."""
        self.metrics.step_seconds.observe(step_seconds)
        self.metrics.batch_size.observe(num_outputs)
        self.gauges(loop)

    def gauges(self, loop) -> None:
        """Queue, batch, KV and adapter state now (also after requests leave without a step)."""
        m = self.metrics
        engine = loop.engine
        scheduler = engine.scheduler
        slots = engine.slots
        m.queue_depth.set(loop.num_waiting())
        m.running.set(len(scheduler.running))
        blocks = engine.blocks
        m.kv_usage.set(1.0 - blocks.num_free / blocks.num_blocks)
        counters = {"loads": m.adapter_loads, "evictions": m.adapter_evictions, "hits": m.adapter_hits,
                    "misses": m.adapter_misses, "load_failures": m.adapter_load_failures}
        counters["merge_switches"] = m.merge_switches
        counters["reused_tokens"] = m.reused_prompt_tokens
        owners = {"merge_switches": engine, "reused_tokens": scheduler}
        for name, counter in counters.items():
            value = getattr(owners.get(name, slots), name)
            if value > self._seen[name]:
                counter.inc(value - self._seen[name])
            self._seen[name] = value
        while slots.load_seconds:
            m.adapter_load_seconds.observe(slots.load_seconds.pop())
        m.resident.set(len(slots.resident()))
        running = _addressable({s.adapter for s in scheduler.running if s.adapter})
        waiting = _addressable({s.adapter for s in scheduler.waiting if s.adapter})
        m.set_lora_info(sorted(running), sorted(waiting - running), slots.max_loras)


def _addressable(refs: set[str]) -> set[str]:
    """Each engine ref ("sum@2") under both names a request may use ("sum@2" and "sum"), so an
    adapter-affinity router that compares the request's `model` with these labels finds it."""
    return refs | {ref.partition("@")[0] for ref in refs}
