"""/metrics of a real server: a valid exposition (promtool), and counters, histograms and
gauges that moved exactly as the traffic sent implies."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import Counter

import pytest

from loraplex.clients.aio import AsyncClient
from loraplex.clients.client import Client, LoraplexError
from loraplex.server.api.metrics import NO_ENDPOINT, OTHER_ENDPOINTS, UNKNOWN_ENDPOINT

MAX_ENDPOINT_LABELS = 4
OK_TRAFFIC = [  # (endpoint or None, client.generate/stream kwargs)
    *[("alpha", dict(prompt=f"hello world {i}", max_new_tokens=3 + i)) for i in range(5)],
    *[("beta", dict(prompt=p, max_new_tokens=6)) for p in ("the quick", "SELECT name", "good morning")],
    (None, dict(prompt="the quick brown fox", max_new_tokens=7)),
    (None, dict(prompt="hello", max_new_tokens=1)),  # one token: no time-per-output-token sample
    (None, dict(prompt="translate to French", adapter="beta-lora", max_new_tokens=5)),
    (None, dict(prompt="jumps over", adapter="beta-lora@1", max_new_tokens=9, ignore_eos=True)),
]
ERROR_TRAFFIC = [  # (endpoint or None, kwargs, status label)
    ("ghost", dict(prompt="hi"), "not_found"),
    (None, dict(prompt="hi", adapter="nope"), "not_found"),
    ("alpha", dict(prompt="hi", max_new_tokens=0), "invalid_argument"),
]


async def _send(target: str):
    async with AsyncClient(target, timeout=120) as client:
        async def ok(i: int, endpoint, kwargs):
            if i % 2:  # half streamed, half unary
                events = [e async for e in client.stream(endpoint=endpoint, **kwargs)]
                return events[-1].prompt_tokens, events[-1].completion_tokens
            c = await client.generate(endpoint=endpoint, **kwargs)
            return c.prompt_tokens, c.completion_tokens

        async def bad(endpoint, kwargs):
            with pytest.raises(LoraplexError) as info:
                await client.generate(endpoint=endpoint, **kwargs)
            return info.value.code

        usage = await asyncio.gather(*(ok(i, e, kw) for i, (e, kw) in enumerate(OK_TRAFFIC)))
        codes = await asyncio.gather(*(bad(e, kw) for e, kw, _ in ERROR_TRAFFIC))
    return usage, codes


@pytest.fixture(scope="module")
def traffic(module_server_factory, tiny_adapters, api):
    server = module_server_factory("--max-endpoint-labels", str(MAX_ENDPOINT_LABELS), name="metrics")
    with Client(server.target, timeout=60) as client:
        client.upload_adapter("alpha-lora", tiny_adapters["attn4"])
        client.register_adapter("beta-lora", str(tiny_adapters["mlp8"]))
        client.create_endpoint("alpha", adapter="alpha-lora", defaults={"temperature": 0})
        client.create_endpoint("beta", adapter="beta-lora", template="Task: {input}", defaults={"ignore_eos": True})
    usage, codes = asyncio.run(asyncio.wait_for(_send(server.target), 120))
    assert codes == ["NOT_FOUND", "NOT_FOUND", "INVALID_ARGUMENT"]
    # a request is counted as its RPC ends, which may be just after the client has its answer
    sent = len(OK_TRAFFIC) + len(ERROR_TRAFFIC)
    return server, usage, _scrape_when(api, server, lambda t: api.metric(t, "loraplex_requests_total") == sent)


def _scrape_when(api, server, condition) -> str:
    """The first scrape for which condition(text) holds."""
    def attempt():
        text = api.scrape(server)
        return text if condition(text) else None

    return api.wait_until(attempt, what="the metrics to catch up")


def test_promtool_accepts_the_exposition(traffic, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (CI installs Debian's prometheus)")
    _, _, text = traffic
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr  # not even lint warnings


def test_every_metric_is_prefixed_and_present(traffic, api):
    _, _, text = traffic
    names = {s.name for s in api.samples(text)}
    assert all(n.startswith("loraplex_") for n in names), sorted(n for n in names if not n.startswith("loraplex_"))
    for expected in ("loraplex_requests_total", "loraplex_time_to_first_token_seconds_count",
                     "loraplex_time_per_output_token_seconds_count", "loraplex_request_duration_seconds_count",
                     "loraplex_generated_tokens_total", "loraplex_prompt_tokens_total", "loraplex_queue_depth",
                     "loraplex_running_requests", "loraplex_kv_cache_usage_ratio", "loraplex_adapter_loads_total",
                     "loraplex_adapter_cache_hits_total", "loraplex_batch_size_count",
                     "loraplex_step_duration_seconds_count", "loraplex_lora_requests_info",
                     "loraplex_prefix_cache_reused_tokens_total"):
        assert expected in names, expected


def test_request_counters_per_endpoint_and_status(traffic, api):
    _, _, text = traffic
    sent = Counter(e or NO_ENDPOINT for e, _ in OK_TRAFFIC)
    for endpoint, n in sent.items():
        assert api.metric(text, "loraplex_requests_total", endpoint=endpoint, status="ok") == n, endpoint
    assert api.metric(text, "loraplex_requests_total", status="ok") == len(OK_TRAFFIC)
    assert api.metric(text, "loraplex_requests_total", status="not_found") == 2
    # a name that is no endpoint is not a label of its own; a request naming none has its own label
    assert api.metric(text, "loraplex_requests_total", endpoint=UNKNOWN_ENDPOINT, status="not_found") == 1
    assert api.metric(text, "loraplex_requests_total", endpoint=NO_ENDPOINT, status="not_found") == 1
    assert api.label_values(text, "loraplex_requests_total", "endpoint") == {"alpha", "beta", NO_ENDPOINT,
                                                                             UNKNOWN_ENDPOINT}
    assert api.metric(text, "loraplex_requests_total", status="invalid_argument") == 1
    statuses = api.label_values(text, "loraplex_requests_total", "status")
    assert statuses == {"ok", "not_found", "invalid_argument"}


def test_refused_request_to_an_existing_endpoint_keeps_its_label(traffic, api):
    _, _, text = traffic
    assert api.metric(text, "loraplex_requests_total", endpoint="alpha", status="invalid_argument") == 1
    assert api.metric(text, "loraplex_requests_total", endpoint=UNKNOWN_ENDPOINT, status="invalid_argument") == 0


def test_token_counters_equal_usage(traffic, api):
    _, usage, text = traffic
    for endpoint in ("alpha", "beta", NO_ENDPOINT):
        mine = [u for (e, _), u in zip(OK_TRAFFIC, usage) if (e or NO_ENDPOINT) == endpoint]
        assert api.metric(text, "loraplex_generated_tokens_total", endpoint=endpoint) == sum(c for _, c in mine)
        assert api.metric(text, "loraplex_prompt_tokens_total", endpoint=endpoint) == sum(p for p, _ in mine)
    assert api.metric(text, "loraplex_generated_tokens_total") == sum(c for _, c in usage)
    # beta's defaults say ignore_eos, so its requests ran to their length
    assert [c for (e, _), (_, c) in zip(OK_TRAFFIC, usage) if e == "beta"] == [6, 6, 6]


def test_latency_histograms_count_every_successful_request(traffic, api):
    _, usage, text = traffic
    for endpoint in ("alpha", "beta", NO_ENDPOINT):
        mine = [u for (e, _), u in zip(OK_TRAFFIC, usage) if (e or NO_ENDPOINT) == endpoint]
        for name in ("loraplex_time_to_first_token_seconds", "loraplex_request_duration_seconds"):
            assert api.metric(text, f"{name}_count", endpoint=endpoint) == len(mine), (name, endpoint)
            assert api.metric(text, f"{name}_bucket", endpoint=endpoint, le="+Inf") == len(mine)
            assert api.metric(text, f"{name}_sum", endpoint=endpoint) > 0
        assert (api.metric(text, "loraplex_time_per_output_token_seconds_count", endpoint=endpoint)
                == sum(c > 1 for _, c in mine)), endpoint
    # failed requests get no latency samples
    assert api.metric(text, "loraplex_time_to_first_token_seconds_count") == len(OK_TRAFFIC)


def test_adapter_and_engine_metrics(traffic, api):
    _, _, text = traffic
    loads = api.metric(text, "loraplex_adapter_loads_total")
    assert loads >= 2  # both LoRAs were used
    assert api.metric(text, "loraplex_adapter_cache_misses_total") == loads
    assert api.metric(text, "loraplex_adapter_cache_hits_total") > 0
    assert api.metric(text, "loraplex_adapter_load_seconds_count") == loads
    assert api.metric(text, "loraplex_adapter_load_failures_total") == 0
    assert api.metric(text, "loraplex_registered_adapters") == 2
    assert api.metric(text, "loraplex_resident_adapters") == 2
    assert api.metric(text, "loraplex_step_duration_seconds_count") > 0
    # every step's batch is counted; together they produced every generated token
    assert api.metric(text, "loraplex_batch_size_sum") >= api.metric(text, "loraplex_generated_tokens_total")
    # after the traffic: nothing waiting, nothing running, the KV cache empty again
    assert api.metric(text, "loraplex_queue_depth") == 0
    assert api.metric(text, "loraplex_running_requests") == 0
    assert api.metric(text, "loraplex_kv_cache_usage_ratio") == 0
    assert api.label_values(text, "loraplex_lora_requests_info", "max_lora") == {"32"}


def test_reused_prompt_positions_are_counted(module_server_factory, api):
    """The same prompt twice, one after the other, on blocks of 4: the second reuses every full
    block before its last prompt position."""
    server = module_server_factory("--block-size", "4", name="prefix-cache")
    prompt = "the quick brown fox jumps over the lazy dog, hello world, this is loraplex"
    with Client(server.target, timeout=60) as client:
        first = client.generate(prompt, max_new_tokens=2)
        client.generate(prompt, max_new_tokens=2)
    expected = (first.prompt_tokens - 1) // 4 * 4
    assert expected >= 8
    _scrape_when(api, server, lambda t: api.metric(t, "loraplex_prefix_cache_reused_tokens_total") == expected)


def test_endpoint_labels_stay_bounded(traffic, api):
    """Names that are no endpoint take no label slot (a regression test: they did, so a real
    endpoint created later was counted as "other"); beyond --max-endpoint-labels real endpoints
    share one label."""
    server, _, _ = traffic
    with Client(server.target, timeout=60) as client:
        for name in ("ghost-2", "ghost-3", "ghost-4"):  # with "ghost", enough to fill every slot
            with pytest.raises(LoraplexError) as info:
                client.generate("hi", endpoint=name)
            assert info.value.code == "NOT_FOUND"
        for name in ("gamma", "delta", "epsilon"):  # alpha, beta, gamma, delta fill the 4 slots
            client.create_endpoint(name, adapter="alpha-lora")
            client.generate("hello", endpoint=name, max_new_tokens=2)
    text = _scrape_when(api, server, lambda t: api.metric(t, "loraplex_requests_total", status="ok")
                        == len(OK_TRAFFIC) + 3)
    for label in ("gamma", "delta", OTHER_ENDPOINTS):
        assert api.metric(text, "loraplex_requests_total", endpoint=label, status="ok") == 1, label
    assert api.metric(text, "loraplex_requests_total", endpoint=UNKNOWN_ENDPOINT, status="not_found") == 4
    labels = api.label_values(text, "loraplex_requests_total", "endpoint")
    assert labels == {"alpha", "beta", "gamma", "delta", NO_ENDPOINT, UNKNOWN_ENDPOINT, OTHER_ENDPOINTS}, labels
