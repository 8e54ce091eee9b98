"""A server's life: restart on the same store, SIGTERM while streams run, a full queue,
deadlines and client cancellation."""
from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from loraplex.clients.aio import AsyncClient
from loraplex.clients.client import Client, LoraplexError

LONG = 1000  # tokens, on `long_model`: about a second or more of streaming while the test acts


def _outputs(client: Client, requests: list[dict]) -> list[tuple]:
    """One request at a time, so every run computes in the same batch shape."""
    out = []
    for r in requests:
        c = client.generate(**r)
        out.append((c.token_ids, c.text, c.finish_reason, c.endpoint, c.adapter, c.soft_prompt))
    return out


# ----------------------------------------------------------------------------- restart


RESTART_REQUESTS = [
    dict(prompt="the quick brown fox", adapter="task@1", max_new_tokens=10, ignore_eos=True),
    dict(prompt="the quick brown fox", adapter="task@2", max_new_tokens=10, ignore_eos=True),
    dict(prompt="the quick brown fox", adapter="task@3", max_new_tokens=10, ignore_eos=True),
    dict(prompt="the quick brown fox", adapter="task", max_new_tokens=10, ignore_eos=True),
    dict(prompt="hello world", soft_prompt="persona", max_new_tokens=8, ignore_eos=True),
    dict(prompt="hello world", max_new_tokens=8, ignore_eos=True),
    dict(prompt="good morning", endpoint="summarize-v1"),
    dict(prompt="good morning", endpoint="latest"),
    dict(messages=[{"role": "user", "content": "list the users"}], endpoint="combo", max_new_tokens=9),
]


def _snapshot(client: Client) -> tuple:
    adapters = sorted((a["name"], a["version"], a["kind"], a["digest"], a["size_bytes"], sorted(a["ranks"].items()),
                       a["created_at"]) for a in client.list_adapters())
    return adapters, client.list_endpoints()


def test_restart_keeps_adapters_endpoints_and_outputs(server_factory, tiny_adapters, tmp_path):
    store = tmp_path / "shared-store"
    first = server_factory(store=store, name="before")
    with Client(first.target, timeout=60) as client:
        assert client.upload_adapter("task", tiny_adapters["attn4"])["version"] == 1
        assert client.register_adapter("task", str(tiny_adapters["mlp8"]))["version"] == 2
        assert client.upload_adapter("task", tiny_adapters["rs2"])["version"] == 3
        client.register_adapter("persona", str(tiny_adapters["soft"]))
        client.create_endpoint("summarize-v1", adapter="task@1", template="Summarize: {input}",
                               defaults={"max_new_tokens": 6, "ignore_eos": True})
        client.create_endpoint("latest", adapter="task", defaults={"max_new_tokens": 7, "ignore_eos": True})
        client.create_endpoint("combo", adapter="task@2", soft_prompt="persona", system_message="You write SQL.",
                               defaults={"ignore_eos": True})
        client.create_endpoint("split", adapter="task@1", canary=("task@2", 0.25))
        before = _outputs(client, RESTART_REQUESTS)
        snapshot = _snapshot(client)
    assert first.terminate() == 0, first.output()

    second = server_factory(store=store, name="after")
    with Client(second.target, timeout=60) as client:
        assert _snapshot(client) == snapshot
        assert client.get_endpoint("latest")["adapter"] == "task@3"
        after = _outputs(client, RESTART_REQUESTS)
        # registration goes on where it left off
        assert client.register_adapter("task", str(tiny_adapters["attn4"]))["version"] == 4
    assert after == before
    served = [b[4] for b in before]
    assert served[:4] == ["task@1", "task@2", "task@3", "task@3"]
    assert len({tuple(b[0]) for b in before[:3]}) == 3  # three versions, three different answers
    assert "not servable" not in second.output(), second.output()


def test_a_stored_adapter_this_model_cannot_serve_is_reported_once(server_factory, builders, tmp_path, tiny_adapters,
                                                                    api):
    """A replica whose base model differs from the one a stored adapter was made for reports that
    adapter once (at start-up, or at the poll that first sees a new version), not on every poll,
    refuses requests for it with a precise error, and serves everyone else."""
    store = tmp_path / "shared-store"
    narrow = builders.llama(tmp_path / "narrow-llama", hidden_size=32, intermediate_size=64)
    tiny = server_factory(store=store, name="tiny")
    with Client(tiny.target, timeout=60) as client:
        client.upload_adapter("task", tiny_adapters["attn4"])
    other = server_factory("--registry-poll-seconds", "0.1", store=store, name="narrow", model=narrow)
    with Client(tiny.target, timeout=60) as client:
        client.upload_adapter("task", tiny_adapters["mlp8"])  # version 2, first seen by a poll
    api.wait_until(lambda: "task@2 is not servable" in other.output(), timeout=30,
                   what="the narrow replica to report task@2")
    time.sleep(1.0)  # ten more polls
    with Client(other.target, timeout=60) as client:
        assert len(client.generate("hello world", max_new_tokens=3, ignore_eos=True).token_ids) == 3
        with pytest.raises(LoraplexError) as info:
            client.generate("hello world", adapter="task", max_new_tokens=3)
    assert info.value.code == "FAILED_PRECONDITION", (info.value.code, str(info.value))
    assert "task@2" in str(info.value) and "not servable" in str(info.value)
    log = other.output()
    assert log.count("stored adapter task@1 is not servable") == 1, log
    assert log.count("stored adapter task@2 is not servable") == 1, log


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_lets_running_streams_finish_and_refuses_new_requests(server_factory, long_model, tiny_adapters,
                                                                     api):
    server = server_factory(name="sigterm", model=long_model)
    with Client(server.target, timeout=60) as client:
        client.upload_adapter("task", tiny_adapters["attn4"])

    async def scenario():
        async with AsyncClient(server.target, timeout=120) as client:
            started = [asyncio.Event() for _ in range(6)]
            ended: list[bool] = [False] * 6

            async def stream(i: int):
                events = []
                async for e in client.stream(f"hello world {i}", adapter="task" if i % 2 else None,
                                             max_new_tokens=LONG, ignore_eos=True):
                    events.append(e)
                    started[i].set()
                ended[i] = True
                return events

            tasks = [asyncio.create_task(stream(i)) for i in range(6)]
            for s in started:
                await s.wait()
            server.proc.send_signal(signal.SIGTERM)
            in_flight = ended.count(False)
            # the server notices the signal at once; a new request is refused while the streams go on
            deadline = time.monotonic() + 10
            while True:
                try:
                    await client.generate("hi", max_new_tokens=2)
                except LoraplexError as exc:
                    refusal = exc
                    break
                assert time.monotonic() < deadline, "still accepting new requests 10 s after SIGTERM"
                await asyncio.sleep(0.01)
            try:
                status = api.health(server.target, timeout=5)
            except grpc.RpcError as exc:  # the port may be closed already
                status = exc.code().name
            return in_flight, refusal, status, await asyncio.gather(*tasks)

    in_flight, refusal, status, streams = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert in_flight == 6, "some streams ended before the signal"
    assert refusal.code == "UNAVAILABLE", refusal
    assert refusal.message == "the server is shutting down"  # refused while the streams still ran
    assert status in ("NOT_SERVING", "UNAVAILABLE"), status
    for events in streams:
        assert events[-1].finish_reason == "length"
        assert events[-1].completion_tokens == LONG == sum(len(e.token_ids) for e in events)
        assert not any(e.is_final for e in events[:-1])
    assert server.proc.wait(timeout=60) == 0, server.output()
    log = server.output()
    assert "shutting down" in log and "Traceback" not in log, log


# ----------------------------------------------------------------------------- queue, deadline, cancel

QUEUE_LONG = 300  # the two running requests: far longer than a refusal takes


@pytest.fixture(scope="module")
def small_server(module_server_factory, long_model):
    """Two running at most, one waiting at most."""
    return module_server_factory("--max-queue", "1", "--max-running", "2", name="small", model=long_model)


def _cancelled(api, server, how: str = "cancel") -> float:
    """Requests that ended early: by the client's cancel, or by their deadline passing."""
    status = "deadline_exceeded" if how == "deadline" else "cancelled"
    return api.metric(api.scrape(server), "loraplex_requests_total", status=status)


async def _start_two_long(client: AsyncClient, max_new_tokens: int, ended_at: list[float]) -> list[asyncio.Task]:
    """Fill both running slots. One after the other: with --max-queue 1 a second request sent
    while the first still waits to be scheduled would be refused."""
    async def long(i: int, started: asyncio.Event) -> int:
        n = 0
        async for e in client.stream(f"the quick brown fox {i}", max_new_tokens=max_new_tokens, ignore_eos=True):
            n += len(e.token_ids)
            started.set()
        ended_at.append(time.monotonic())
        return n

    tasks = []
    for i in range(2):
        started = asyncio.Event()
        tasks.append(asyncio.create_task(long(i, started)))
        await asyncio.wait_for(started.wait(), 60)
    return tasks


async def _refused_or_ok(call) -> tuple:
    try:
        c = await call
        return "ok", c, time.monotonic()
    except LoraplexError as exc:
        return exc.code, exc, time.monotonic()


def test_full_queue_refuses_at_once(small_server, api):
    async def scenario():
        async with AsyncClient(small_server.target, timeout=120) as client:
            ended_at: list[float] = []
            longs = await _start_two_long(client, QUEUE_LONG, ended_at)
            # the queue's one place: wait until the engine holds it as waiting
            queued = asyncio.create_task(_refused_or_ok(client.generate("hello", max_new_tokens=4, ignore_eos=True)))
            await asyncio.to_thread(api.wait_until, lambda: api.metric(api.scrape(small_server), "loraplex_queue_depth")
                                    == 1, 30, 0.005, "the queued request")
            extras = await asyncio.gather(*(_refused_or_ok(client.generate(f"hi {i}", max_new_tokens=4))
                                            for i in range(2)))
            return await asyncio.gather(*longs), await queued, extras, min(ended_at)

    longs, queued, extras, first_long_end = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert longs == [QUEUE_LONG, QUEUE_LONG]
    assert queued[0] == "ok" and queued[1].completion_tokens == 4  # it waited for a slot, then ran
    for code, exc, at in extras:
        assert code == "RESOURCE_EXHAUSTED", exc
        assert "1 requests are already waiting (--max-queue 1)" in exc.message, exc.message
        assert at < first_long_end, "the refusal waited for the running requests"  # at once
    text = api.scrape(small_server)
    assert api.metric(text, "loraplex_requests_total", status="resource_exhausted") == 2


def test_queue_bound_holds_under_a_burst(small_server):
    """A burst of requests while both running slots are busy: exactly --max-queue of them (1) is
    queued, every other one is refused at once, never one too many (the engine must count a
    request as waiting without a gap while handing it from the front to its scheduler)."""
    async def scenario():
        async with AsyncClient(small_server.target, timeout=120) as client:
            longs = await _start_two_long(client, LONG, [])
            burst = [asyncio.create_task(_refused_or_ok(client.generate(f"hello {i}", max_new_tokens=4)))
                     for i in range(12)]
            await asyncio.wait(burst, timeout=2.0)  # refusals come at once; the queued one waits
            refused = [t.result() for t in burst if t.done()]
            for task in longs:  # free the running slots (the client cancels them)
                task.cancel()
            return refused, [await t for t in burst]

    refused_early, results = asyncio.run(asyncio.wait_for(scenario(), 120))
    codes = sorted(code for code, _, _ in results)
    assert codes == ["RESOURCE_EXHAUSTED"] * 11 + ["ok"], codes
    assert sum(code == "RESOURCE_EXHAUSTED" for code, _, _ in refused_early) == 11  # refused at once


def _long_then_stop(server, how: str):
    """Start a long stream, take its first delta, then let the deadline pass or cancel it."""
    with Client(server.target, timeout=60) as client:
        if how == "deadline":
            events = []
            with pytest.raises(LoraplexError) as info:
                for e in client.stream("the quick brown fox", max_new_tokens=LONG, ignore_eos=True, timeout=0.5):
                    events.append(e)
            assert info.value.code == "DEADLINE_EXCEEDED", info.value
            assert events and not any(e.is_final for e in events)  # it was generating when the deadline came
        else:
            stream = client.stream("the quick brown fox", max_new_tokens=LONG, ignore_eos=True)
            first = next(stream)
            assert not first.is_final
            stream.close()  # leaving the loop early cancels the call


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_deadline_or_cancel_frees_the_request(small_server, api, how):
    before = _cancelled(api, small_server, how)
    _long_then_stop(small_server, how)
    # the server counted it as cancelled (and asked the engine to drop it, just before)
    api.wait_until(lambda: _cancelled(api, small_server, how) == before + 1, what="the request counted as ended early")
    with Client(small_server.target, timeout=60) as client:
        later = client.generate("hello world", max_new_tokens=4, ignore_eos=True)
    assert later.completion_tokens == 4 and later.finish_reason == "length"
    # the later request's last step ran after the abort: had the long one stayed in the engine,
    # it would still be running (LONG tokens take far longer than 4), holding KV-cache blocks
    text = api.scrape(small_server)
    assert api.metric(text, "loraplex_running_requests") == 0
    assert api.metric(text, "loraplex_queue_depth") == 0
    assert api.metric(text, "loraplex_kv_cache_usage_ratio") == 0
    assert api.metric(text, "loraplex_requests_total", status="ok") >= 1


def test_gauges_drop_after_a_cancel_without_later_traffic(small_server, api):
    """A regression test: the gauges were refreshed only after engine steps, so with no later
    traffic they kept reporting the cancelled request as running and its KV blocks as used."""
    before = _cancelled(api, small_server, "deadline")
    _long_then_stop(small_server, "deadline")
    api.wait_until(lambda: _cancelled(api, small_server, "deadline") == before + 1,
                   what="the request counted as deadline_exceeded")
    api.wait_until(lambda: api.metric(api.scrape(small_server), "loraplex_running_requests") == 0, timeout=3,
                   what="loraplex_running_requests back to 0")
    assert api.metric(api.scrape(small_server), "loraplex_kv_cache_usage_ratio") == 0


@pytest.mark.parametrize("flag", ["--http-port", "--metrics-port"])
def test_a_port_in_use_is_a_clear_start_up_error(server_factory, flag):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited with 2") as info:
            server_factory(flag, str(port), name=f"busy{flag}")
    assert f"cannot listen on 127.0.0.1:{port}" in str(info.value)
    assert "Traceback" not in str(info.value)
