"""Open-loop load through the gRPC API: requests are sent at their arrival times whatever the
server's progress (Poisson arrivals), each as a stream, and every token's arrival is recorded."""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Spec:
    """One request to send `at` seconds after the start."""

    at: float
    prompt: str
    max_new_tokens: int
    adapter: str | None = None


@dataclass
class Record:
    spec: Spec
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)  # one entry per token received
    done: float = 0.0
    code: str = "OK"  # gRPC status name
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    def gaps(self) -> list[float]:
        """Seconds between consecutive tokens (a delta carrying k tokens counts k-1 zero gaps)."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


def poisson_arrivals(rate: float, count: int, seed: int = 0) -> list[float]:
    """`count` arrival offsets (seconds) of a Poisson process at `rate` per second."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def _one(client, spec: Spec, start: float, record: Record, timeout: float) -> None:
    from loraplex.clients.client import LoraplexError

    await asyncio.sleep(max(0.0, start + spec.at - time.perf_counter()))
    record.sent = time.perf_counter()
    try:
        async for event in client.stream(spec.prompt, adapter=spec.adapter, max_new_tokens=spec.max_new_tokens,
                                         ignore_eos=True, temperature=0.0, timeout=timeout):
            now = time.perf_counter()
            record.token_times += [now] * len(event.token_ids)
    except LoraplexError as exc:
        record.code, record.message = exc.code, str(exc)
    record.done = time.perf_counter()


async def run_specs(target: str, specs: list[Spec], timeout: float = 600) -> list[Record]:
    from loraplex.clients.aio import AsyncClient

    records = [Record(s) for s in specs]
    async with AsyncClient(target) as client:
        start = time.perf_counter()
        await asyncio.gather(*(_one(client, s, start, r, timeout) for s, r in zip(specs, records)))
    return records


def run(target: str, specs: list[Spec], timeout: float = 600) -> list[Record]:
    """Send `specs` open-loop and wait for every answer."""
    return asyncio.run(run_specs(target, specs, timeout))


def summarize(records: list[Record], offered_rate: float | None = None) -> dict:
    """Achieved rates and the client's view of failures and latency."""
    ok = [r for r in records if r.ok]
    failures: dict[str, int] = {}
    for r in records:
        if not r.ok:
            failures[r.code] = failures.get(r.code, 0) + 1
    first_sent = min(r.sent for r in records)
    span = max(r.done for r in records) - first_sent
    sent_span = max(r.sent for r in records) - first_sent
    tokens = sum(len(r.token_times) for r in ok)
    lost = sum(1 for r in ok if len(r.token_times) != r.spec.max_new_tokens)
    failed_after = [r.done - r.sent for r in records if not r.ok]
    return {
        "requests": len(records),
        "completed": len(ok),
        "failures": failures,
        "short_streams": lost,
        "offered_rate": offered_rate,
        "sent_rate": (len(records) - 1) / sent_span if sent_span > 0 else None,
        "achieved_rate": len(ok) / span if span > 0 else 0.0,
        "tokens_per_s": tokens / span if span > 0 else 0.0,
        "seconds": span,
        "client_ttft_p50": _pct([r.token_times[0] - r.sent for r in ok if r.token_times], 50),
        "rejection_seconds_max": max(failed_after) if failed_after else None,
    }


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if p < 100 else max(values)
