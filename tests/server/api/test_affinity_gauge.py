"""The adapter-affinity gauge (`loraplex_lora_requests_info`, the Gateway API Inference
Extension's model-server protocol) names the adapters running and waiting while requests run."""
from __future__ import annotations

import asyncio

from loraplex.clients.aio import AsyncClient
from loraplex.clients.client import Client

LONG = 1500  # tokens on `long_model`: the first stream runs for seconds while the test looks


def _labels(api, server) -> tuple[set[str], set[str], set[str]]:
    text = api.scrape(server)
    sets = []
    for label in ("running_lora_adapters", "waiting_lora_adapters"):
        values = api.label_values(text, "loraplex_lora_requests_info", label)
        assert len(values) == 1, values  # one series at a time: the old one is removed on change
        sets.append({name for name in values.pop().split(",") if name})
    return sets[0], sets[1], api.label_values(text, "loraplex_lora_requests_info", "max_lora")


def test_running_and_waiting_adapters_while_requests_run(server_factory, long_model, tiny_adapters, api):
    server = server_factory("--max-loras", "1", name="affinity", model=long_model)
    with Client(server.target, timeout=60) as client:
        client.upload_adapter("first", tiny_adapters["attn4"])
        client.upload_adapter("second", tiny_adapters["mlp8"])
    assert _labels(api, server)[:2] == (set(), set())

    async def scenario():
        async with AsyncClient(server.target, timeout=120) as client:
            first_started, second_started = asyncio.Event(), asyncio.Event()

            async def stream(adapter: str, started: asyncio.Event) -> None:
                async for _ in client.stream("hello world", adapter=adapter, max_new_tokens=LONG, ignore_eos=True):
                    started.set()

            first = asyncio.create_task(stream("first", first_started))
            await first_started.wait()
            second = asyncio.create_task(stream("second", second_started))
            # one slot, held by the running "first": "second" waits for it
            waiting = await asyncio.to_thread(
                api.wait_until, lambda: _labels(api, server)[1], 10, 0.05, "the waiting adapter in the gauge")
            running, _, max_lora = _labels(api, server)
            assert (running, waiting, max_lora) == ({"first", "first@1"}, {"second", "second@1"}, {"1"})
            assert not second_started.is_set()
            first.cancel()  # the slot frees: "second" runs
            await second_started.wait()
            running, waiting, _ = await asyncio.to_thread(_labels, api, server)
            assert (running, waiting) == ({"second", "second@1"}, set())
            second.cancel()
            await asyncio.gather(first, second, return_exceptions=True)

    asyncio.run(scenario())
    api.wait_until(lambda: _labels(api, server)[:2] == (set(), set()), what="both sets to empty")
