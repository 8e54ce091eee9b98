"""The engine's face for observers: an immutable stats snapshot, and an event log that every
reader reads with its own cursor, told how many events it missed when it fell behind."""
from __future__ import annotations

import dataclasses

import pytest

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.engine_stats import ADAPTER_LOAD, EngineEvent, EventLog
from loraplex.server.engine.sampler import SamplingParams
from loraplex.server.engine.sequence import Request


def _event(i: int) -> EngineEvent:
    return EngineEvent(ADAPTER_LOAD, f"a{i}", float(i))


def test_readers_keep_their_own_cursors():
    log = EventLog(capacity=8)
    for i in range(3):
        log.record(_event(i))
    first = log.since(0)
    assert first.cursor == 3 and [e.name for e in first.events] == ["a0", "a1", "a2"] and first.missed == 0
    log.record(_event(3))
    assert [e.name for e in log.since(first.cursor).events] == ["a3"]
    assert len(log.since(0).events) == 4  # another reader still finds everything: nothing was drained
    assert log.since(4).events == [] and log.since(4).cursor == 4


def test_a_reader_that_falls_behind_is_told_what_it_missed():
    log = EventLog(capacity=4)
    for i in range(10):
        log.record(_event(i))
    page = log.since(3)
    assert page.missed == 3 and [e.name for e in page.events] == ["a6", "a7", "a8", "a9"] and page.cursor == 10
    assert log.since(0).missed == 6
    with pytest.raises(ValueError, match="cursor 11"):
        log.since(11)


def test_stats_are_a_frozen_snapshot_and_loads_are_events(tiny_model, tiny_adapters):
    engine = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=512, max_loras=2))
    for name in ("attn4", "mlp8", "soft"):
        engine.register_adapter(name, str(tiny_adapters[name]))
    before = engine.stats()
    assert before.adapter_loads == 0 and before.kv_usage == 0.0 and before.resident_adapters == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.adapter_loads = 1
    engine.pin_adapter("attn4")
    assert engine.residency("attn4") == "pinned" and engine.residency("soft") == "registered"
    assert engine.residency("nope") is None and engine.adapter_kind("soft") == "soft_prompt"
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    engine.generate([Request(prompt="hello", adapter="mlp8", params=params)])
    after = engine.stats()
    assert after.adapter_loads == 2 and after.adapter_misses == 2 and before.adapter_loads == 0
    assert set(after.resident_adapters) == {"attn4", "mlp8"} and engine.residency("mlp8") == "resident"
    assert engine.registered_adapters() == {"attn4", "mlp8", "soft"}
    page = engine.events(0)
    assert [(e.kind, e.name) for e in page.events] == [(ADAPTER_LOAD, "attn4"), (ADAPTER_LOAD, "mlp8")]
    assert all(e.seconds > 0 for e in page.events) and page.missed == 0
    assert engine.events(page.cursor).events == []  # read, yet still there for another reader:
    assert len(engine.events(0).events) == 2
    engine.unpin_adapter("attn4")
    assert engine.residency("attn4") == "resident"
    assert engine.num_waiting() == engine.num_running() == 0 and engine.running_requests() == []
