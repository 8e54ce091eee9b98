"""Background work on a CPU runs between the engine's steps, in short slices, not beside them.

On a CPU the engine's parallel ops use every core, and each op waits for its slowest thread. A
background thread (the adapter reader) that takes a core from one of them delays every op it
overlaps, however low its priority: measured on 2 cores with 16 rank-64 adapters loading, steps
that should take 23 ms took 100-280 ms while reads ran beside them. So the reader cuts its work
into slices of a few milliseconds (`slice`) inside a `job`, and the engine, before each step, lets
slices run for up to `budget` seconds while a job is under way, then holds the next one until the
step is over (`step`). Between steps, and while the engine is idle, slices run freely.

The cost to the running streams is bounded by the budget per step; the reader's own work is
unchanged, only scheduled. With `enabled=False` (a GPU engine, whose thread mostly waits on the
device) both sides pass straight through.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Longest the engine waits for background slices before a step (when any are waiting).
STEP_BUDGET_S = 0.004
# Longest it waits for a slice under way past the budget: a read stuck on a slow disk must not
# stop the streams (the step then runs beside it).
STUCK_SLICE_S = 0.1


class Interleaver:
    def __init__(self, enabled: bool = True, budget: float = STEP_BUDGET_S) -> None:
        self.enabled = enabled
        self.budget = budget
        self._cond = threading.Condition()
        self._open = True  # slices may start (between steps, or the engine idle)
        self._wanting = 0  # slices waiting to start
        self._running = 0  # slices under way
        self._jobs = 0  # jobs under way (they will want more slices)

    @contextmanager
    def job(self) -> Iterator[None]:
        """Background side, around a whole piece of work cut into slices: while it lasts, the
        engine spends its whole budget on it before each step, not one slice."""
        with self._cond:
            self._jobs += 1
        try:
            yield
        finally:
            with self._cond:
                self._jobs -= 1
                self._cond.notify_all()

    @contextmanager
    def slice(self) -> Iterator[None]:
        """Background side: run the body while the engine is between steps."""
        if not self.enabled:
            yield
            return
        with self._cond:
            self._wanting += 1
            self._cond.notify_all()
            while not self._open:
                self._cond.wait()
            self._wanting -= 1
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _wait_while(self, busy: Callable[[], object], seconds: float) -> None:
        """With the lock held: wait until `busy()` is false or `seconds` have passed."""
        deadline = time.monotonic() + seconds
        while busy():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    @contextmanager
    def step(self) -> Iterator[None]:
        """Engine side, around one step: first let waiting slices run for up to `budget`
        seconds, then keep new ones from starting (one under way finishes, or runs on beside
        the step after `STUCK_SLICE_S`) until the step ends."""
        if not self.enabled:
            yield
            return
        with self._cond:
            self._wait_while(lambda: self._wanting or self._running or self._jobs, self.budget)
            self._open = False
            self._wait_while(lambda: self._running, STUCK_SLICE_S)
        try:
            yield
        finally:
            with self._cond:
                self._open = True
                self._cond.notify_all()
