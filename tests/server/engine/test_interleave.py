"""Interleaver: background slices run between the engine's steps, never beside them, within a
budget per step; with nothing stepping they run freely; disabled, nothing waits."""
from __future__ import annotations

import threading
import time

from loraplex.server.engine.interleave import STUCK_SLICE_S, Interleaver


def _background(gate: Interleaver, slices: int, events: list, lock: threading.Lock, seconds: float = 0.002):
    with gate.job():
        for _ in range(slices):
            with gate.slice():
                with lock:
                    events.append(("slice", time.monotonic(), None))
                time.sleep(seconds)
                with lock:
                    start = events.pop()[1]
                    events.append(("slice", start, time.monotonic()))


def _spans(events, kind):
    return [(a, b) for k, a, b in events if k == kind]


def test_slices_never_overlap_a_step_and_each_step_waits_at_most_its_budget():
    gate = Interleaver(budget=0.003)
    events: list = []
    lock = threading.Lock()
    reader = threading.Thread(target=_background, args=(gate, 40, events, lock))
    reader.start()
    waits = []
    while reader.is_alive():
        asked = time.monotonic()
        with gate.step():
            began = time.monotonic()
            waits.append(began - asked)
            time.sleep(0.01)  # the step's compute
            with lock:
                events.append(("step", began, time.monotonic()))
    reader.join()
    slices, steps = _spans(events, "slice"), _spans(events, "step")
    assert len(slices) == 40 and len(steps) >= 2
    for s0, s1 in slices:
        for t0, t1 in steps:
            assert s1 <= t0 or s0 >= t1, "a background slice ran during a step"
    # the budget, plus at most one slice that was under way when it ran out (and scheduling slack)
    assert max(waits) < 0.003 + 0.002 + 0.02
    # slices went through within the budget of several steps, not one slice per step
    assert len(steps) < 40


def test_with_no_step_running_slices_run_freely():
    gate = Interleaver(budget=0.001)
    events: list = []
    reader = threading.Thread(target=_background, args=(gate, 5, events, threading.Lock(), 0.0))
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive() and len(_spans(events, "slice")) == 5


def _one_slice(gate: Interleaver, started: threading.Event) -> None:
    with gate.slice():
        started.set()


def test_a_step_holds_slices_that_ask_during_it():
    gate = Interleaver(budget=0.0)
    started = threading.Event()
    with gate.step():
        reader = threading.Thread(target=_one_slice, args=(gate, started))
        reader.start()
        assert not started.wait(0.1), "a slice started inside a step"
    assert started.wait(5), "the slice did not start once the step ended"
    reader.join()


def test_disabled_nothing_waits():
    gate = Interleaver(enabled=False)
    started = threading.Event()
    with gate.step():
        reader = threading.Thread(target=_one_slice, args=(gate, started))
        reader.start()
        assert started.wait(5)
    reader.join()


def test_a_stuck_slice_does_not_stop_the_steps():
    """A read blocked inside its slice (a slow disk) delays a step by at most STUCK_SLICE_S."""
    gate = Interleaver(budget=0.001)
    inside, release = threading.Event(), threading.Event()

    def stuck() -> None:
        with gate.slice():
            inside.set()
            release.wait(10)

    reader = threading.Thread(target=stuck)
    reader.start()
    assert inside.wait(5)
    asked = time.monotonic()
    with gate.step():
        waited = time.monotonic() - asked
    release.set()
    reader.join()
    assert STUCK_SLICE_S <= waited < STUCK_SLICE_S + 1.0
