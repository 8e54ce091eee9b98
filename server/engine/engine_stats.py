"""What the engine tells its observers: a snapshot of its counters, and a log of events.

Observers (the server's metrics, a benchmark, a test) used to reach into the scheduler and the
adapter slots, and the metrics layer drained `slots.load_seconds` as it read it: a second reader
would have stolen its samples, and with no reader at all (offline `generate`) the list grew for
the life of the process. Now an observer only reads:

- `Engine.stats()` -> `EngineStats`, an immutable snapshot of every counter and gauge, taken on
  the engine's thread. Counters only grow; an observer keeps what it saw last and reports the
  difference.
- `Engine.events(cursor)` -> `EventPage` for what a snapshot cannot carry, such as each adapter
  load's duration. Events sit in a bounded ring (`EventLog`); every reader keeps its own cursor,
  so readers never take events from each other. A reader that falls more than the ring's
  capacity behind is told how many events it missed (`EventPage.missed`), never left to guess.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

EVENT_CAPACITY = 4096  # events kept for slow readers; the server's metrics read after every step
ADAPTER_LOAD = "adapter_load"  # an adapter was copied into a device slot, taking `seconds`


@dataclass(frozen=True)
class EngineStats:
    """Every counter of the engine at one moment (counters only grow), and its state then."""

    waiting: int  # sequences queued, not yet admitted (a request with n completions counts n)
    running: int  # sequences in the running batch
    kv_blocks: int  # KV-cache blocks the engine holds
    kv_blocks_free: int
    adapter_loads: int  # adapters copied into a device slot
    adapter_evictions: int
    adapter_hits: int  # slot acquisitions of an adapter already resident
    adapter_misses: int  # slot acquisitions that had to load it
    adapter_load_failures: int
    merge_switches: int  # switches to or from serving an adapter merged
    reused_prompt_tokens: int  # prompt positions admitted with their KV already computed
    preemptions: int
    max_loras: int  # device slots for adapters
    resident_adapters: tuple[str, ...]  # adapters in a device slot
    running_adapters: frozenset[str]  # adapters of the running sequences
    waiting_adapters: frozenset[str]  # adapters of the queued sequences
    merged_adapter: str | None  # the adapter served from merged weights

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV-cache blocks in use."""
        return 1.0 - self.kv_blocks_free / self.kv_blocks


@dataclass(frozen=True)
class EngineEvent:
    kind: str  # ADAPTER_LOAD
    name: str  # the adapter it concerns
    seconds: float = 0.0  # how long it took


class EventPage(NamedTuple):
    """The events after a reader's cursor, and its next cursor."""

    cursor: int  # pass it to the next `events` call
    events: list[EngineEvent]
    missed: int  # events that left the ring before this reader read them


class EventLog:
    """A bounded ring of events, numbered from 0 as they are recorded; readers keep cursors."""

    def __init__(self, capacity: int = EVENT_CAPACITY) -> None:
        self._events: deque[EngineEvent] = deque(maxlen=capacity)
        self._end = 0  # the number the next event gets

    def record(self, event: EngineEvent) -> None:
        self._events.append(event)
        self._end += 1

    def since(self, cursor: int) -> EventPage:
        """The events numbered `cursor` onwards that the ring still holds (0: from the start)."""
        if not 0 <= cursor <= self._end:
            raise ValueError(f"event cursor {cursor} is outside [0, {self._end}]: pass 0 or a cursor this log returned")
        oldest = self._end - len(self._events)
        first = max(cursor, oldest)
        return EventPage(self._end, list(islice(self._events, first - oldest, None)), first - cursor)
