"""The adapter-affinity gauge the endpoint picker reads (deploy/inference-gateway/epp.yaml's
--lora-info-metric): while requests run, loraplex_lora_requests_info carries exactly one series
whose labels list the running and the waiting adapters (vLLM's form: comma-separated, sorted;
each adapter under both names a request's `model` may use, "name" and "name@version", since the
picker compares them literally) and the number of device slots."""
from __future__ import annotations

import threading
import time

from loraplex.clients.client import Client
from prometheus_client.parser import text_string_to_metric_families

INFO = "loraplex_lora_requests_info"


def lora_info(text: str) -> list[dict[str, str]]:
    return [s.labels for family in text_string_to_metric_families(text) for s in family.samples if s.name == INFO]


def wait_for_info(server, expected: dict[str, str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        seen = lora_info(server.metrics())
        if seen == [expected]:
            return
        assert time.monotonic() < deadline, f"{INFO}: wanted {[expected]}, last scrape {seen}"
        time.sleep(0.05)


def long_stream(client: Client, adapter: str):
    """A stream that keeps running (and holding its adapter's slot) until it is closed."""
    stream = client.stream("the quick brown fox", adapter=adapter, max_new_tokens=1800, ignore_eos=True)
    first = next(stream)
    assert not first.is_final
    return stream


def test_running_and_waiting_adapters_while_requests_run(live_server):
    with Client(live_server.target, timeout=120) as client:
        wait_for_info(live_server, {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "2"})
        gamma_stream = long_stream(client, "gamma")
        alpha_stream = long_stream(client, "alpha")
        wait_for_info(live_server, {"running_lora_adapters": "alpha,alpha@1,gamma,gamma@1", "waiting_lora_adapters": "",
                                    "max_lora": "2"})

        # both slots are held by running streams, so a request for a third adapter waits
        finished: list = []
        waiter = threading.Thread(target=lambda: finished.append(
            client.generate("hello world", adapter="beta", max_new_tokens=3, ignore_eos=True)))
        waiter.start()
        try:
            wait_for_info(live_server, {"running_lora_adapters": "alpha,alpha@1,gamma,gamma@1",
                                        "waiting_lora_adapters": "beta,beta@1", "max_lora": "2"})
            # freeing a slot lets beta run and finish; alpha keeps running
            gamma_stream.close()
            waiter.join(timeout=60)
            assert finished and finished[0].adapter == "beta@1" and finished[0].completion_tokens == 3
            wait_for_info(live_server, {"running_lora_adapters": "alpha,alpha@1", "waiting_lora_adapters": "",
                                        "max_lora": "2"})
        finally:
            gamma_stream.close()
            alpha_stream.close()
            waiter.join(timeout=60)
        wait_for_info(live_server, {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "2"})
