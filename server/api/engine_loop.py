"""The engine's own thread: it alone touches the engine, stepping while there is work.

Fronts (gRPC, later HTTP) run on an asyncio loop. They hand requests over with `submit`, get
each request's outputs on an asyncio queue, and run anything else that touches the engine
(registering adapters, pinning) through `call`, which executes between two steps.

Everything that runs torch in the server runs on one thread, `EngineThread`: building the
engine, restoring adapters at start-up, and the loop. Under OpenMP (libgomp) each thread that
runs a parallel op gets its own team of threads, and once the teams together hold more threads
than there are cores, libgomp makes every waiting thread sleep almost at once instead of
spinning, so each of a step's hundreds of parallel ops waits for its threads to wake. Built on
one thread and stepped on another, the engine's decode steps took 56 ms instead of 37 (4
streams, 2 cores); see also `adapter_slots._one_omp_thread`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

from loraplex.server.engine.engine import Engine
from loraplex.server.engine.sequence import Request, RequestOutput

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


@dataclass
class Submission:
    request: Request
    outputs: asyncio.Queue  # RequestOutput items; the last one has finished=True
    loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.monotonic)


class EngineThread:
    """The server's one torch thread (see the module docstring): runs what it is given, in order.
    A daemon, like the loop it carries, so a server that fails mid-start still exits."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="loraplex-engine", daemon=True).start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the torch thread, awaited (for work before the loop starts)."""
        return await asyncio.wrap_future(self.submit(lambda: fn(*args)))

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def _work(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to whoever awaits it
                    future.set_exception(exc)


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int, on_step: Callable[["EngineLoop", float, int], None] | None = None,
                 on_change: Callable[["EngineLoop"], None] | None = None, thread: EngineThread | None = None) -> None:
        """Both hooks run on the engine thread (metrics): on_step(loop, step_seconds, batch_size)
        after each step, on_change(loop) after commands changed the engine without a step.
        `thread`: the thread that built the engine (a new one if None)."""
        self.engine = engine
        self.max_queue = max_queue
        self.on_step = on_step
        self.on_change = on_change
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._live: dict[str, Submission] = {}
        self._pending = 0  # submitted, not yet handed to the engine
        self._lock = threading.Lock()
        self._thread = thread or EngineThread()
        self._running: Future | None = None

    # called from the fronts -------------------------------------------------------------
    def start(self) -> None:
        self._running = self._thread.submit(self._run)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._running is not None:
            wait([self._running], timeout=30)

    def num_waiting(self) -> int:
        return self._pending + self.engine.num_waiting()

    def num_live(self) -> int:
        return len(self._live)

    def submit(self, request: Request) -> asyncio.Queue:
        """Queue a request; its outputs arrive on the returned queue. Raises QueueFull at once."""
        with self._lock:
            if self.num_waiting() >= self.max_queue:
                raise QueueFull(f"{self.num_waiting()} requests are already waiting (--max-queue {self.max_queue})")
            self._pending += 1
        sub = Submission(request, asyncio.Queue(), asyncio.get_running_loop())
        self._commands.put(("submit", sub))
        self._wake.set()
        return sub.outputs

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def call(self, fn: Callable[[Engine], Any]) -> "asyncio.Future[Any]":
        """Run fn(engine) on the engine thread between steps; await the result."""
        future: Future = Future()
        self._commands.put(("call", (fn, future)))
        self._wake.set()
        return asyncio.wrap_future(future)

    # the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if self._drain_commands() and self.on_change is not None:
                self.on_change(self)
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            self._step()

    def _drain_commands(self) -> int:
        """Run every queued command; returns how many there were."""
        done = 0
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return done
            done += 1
            if kind == "submit":
                self._admit(arg)
            elif kind == "abort":
                if self._live.pop(arg, None) is not None:
                    self.engine.abort(arg)
            else:
                fn, future = arg
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except BaseException as exc:  # handed to the awaiting front
                        future.set_exception(exc)

    def _admit(self, sub: Submission) -> None:
        """Hand a submission to the engine. It stops counting as pending only once the engine's
        queue holds it, so the --max-queue check never sees it in neither place."""
        try:
            request_id = self.engine.add_request(sub.request)
        except Exception as exc:  # refused as given: the front reports it
            self._deliver(sub, exc)
            return
        finally:
            with self._lock:
                self._pending -= 1
        self._live[request_id] = sub

    def _step(self) -> None:
        start = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # an engine bug must not take the server down
            log.exception("engine step failed")
            self._fail_running(exc)
            return
        if self.on_step is not None:
            self.on_step(self, time.monotonic() - start, len(outputs))
        for out in outputs:
            sub = self._live.get(out.request_id)
            if sub is None:
                continue
            if out.finished:
                del self._live[out.request_id]
            self._deliver(sub, out)

    def _fail_running(self, exc: Exception) -> None:
        for request_id in self.engine.running_requests():
            self.engine.abort(request_id)
            sub = self._live.pop(request_id, None)
            if sub is not None:
                self._deliver(sub, RequestOutput(request_id, finished=True, finish_reason="error",
                                                 error=f"engine failure: {type(exc).__name__}: {exc}",
                                                 error_code="INTERNAL"))

    @staticmethod
    def _deliver(sub: Submission, item: RequestOutput | Exception) -> None:
        try:
            sub.loop.call_soon_threadsafe(sub.outputs.put_nowait, item)
        except RuntimeError:  # the front's loop is gone (shutdown)
            pass
