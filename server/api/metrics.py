"""Prometheus metrics (prefix `loraplex_`, base units, `_total` counters), on their own port.

Labels stay bounded: `endpoint` is an operator-created endpoint name, "_none" for requests
without one, "_unknown" for a name that is not an endpoint, and beyond `max_endpoint_labels`
distinct endpoints the rest share "_other" (no endpoint name can start with "_").
The one exception is `loraplex_lora_requests_info`, whose labels list the running and
waiting adapters: that form is fixed by the adapter-affinity routers that read it (the
Gateway API Inference Extension's model-server protocol, as vLLM exposes it).
"""
from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NO_ENDPOINT, UNKNOWN_ENDPOINT, OTHER_ENDPOINTS = "_none", "_unknown", "_other"


class Metrics:
    def __init__(self, max_endpoint_labels: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.max_endpoint_labels = max_endpoint_labels
        self._endpoints: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Finished requests by endpoint and gRPC status.",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time from arrival to the first token.",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loraplex_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request.",
                              ["endpoint"], buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_request_duration_seconds", "Time from arrival to the last token.",
                             ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens of finished requests.",
                                     ["endpoint"], registry=r)
        self.generated_tokens = Counter("loraplex_generated_tokens", "Generated tokens of finished requests.",
                                        ["endpoint"], registry=r)
        self.queue_depth = Gauge("loraplex_queue_depth", "Requests waiting to be scheduled.", registry=r)
        self.running = Gauge("loraplex_running_requests", "Requests in the running batch.", registry=r)
        self.batch_size = Histogram("loraplex_batch_size", "Sequences per engine step.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.step_seconds = Histogram("loraplex_step_duration_seconds", "Duration of one engine step.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.kv_usage = Gauge("loraplex_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", registry=r)
        self.adapter_loads = Counter("loraplex_adapter_loads", "Adapters copied into a device slot.", registry=r)
        self.adapter_evictions = Counter("loraplex_adapter_evictions", "Adapters evicted from a device slot.",
                                         registry=r)
        self.adapter_hits = Counter("loraplex_adapter_cache_hits", "Slot requests served by a resident adapter.",
                                    registry=r)
        self.adapter_misses = Counter("loraplex_adapter_cache_misses", "Slot requests that had to load the adapter.",
                                      registry=r)
        self.adapter_load_failures = Counter("loraplex_adapter_load_failures", "Adapter loads that failed.",
                                             registry=r)
        self.adapter_load_seconds = Histogram("loraplex_adapter_load_seconds", "Time to load one adapter into a slot.",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.merge_switches = Counter("loraplex_merge_switches", "Switches to or from serving an adapter merged.",
                                      registry=r)
        self.reused_prompt_tokens = Counter(
            "loraplex_prefix_cache_reused_tokens",
            "Prompt positions whose keys and values were reused (prefix cache, or a request's n completions) "
            "instead of computed.", registry=r)
        self.resident = Gauge("loraplex_resident_adapters", "Adapters resident in device slots.", registry=r)
        self.registered = Gauge("loraplex_registered_adapters", "Adapter versions in the registry.", registry=r)
        self.lora_info = Gauge("loraplex_lora_requests_info", "Running and waiting adapters (adapter affinity).",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self._lora_labels: tuple[str, str, str] | None = None

    def endpoint_label(self, endpoint: str | None) -> str:
        """The endpoint's name while label slots last, then "_other"; "_none" without one."""
        if not endpoint:
            return NO_ENDPOINT
        if endpoint == UNKNOWN_ENDPOINT:
            return endpoint
        with self._lock:
            if endpoint in self._endpoints:
                return endpoint
            if len(self._endpoints) < self.max_endpoint_labels:
                self._endpoints.add(endpoint)
                return endpoint
        return OTHER_ENDPOINTS

    def record_finished(self, endpoint: str | None, status: str, arrival: float, first_token: float | None,
                        end: float, prompt_tokens: int, generated: int) -> None:
        label = self.endpoint_label(endpoint)
        self.requests.labels(label, status).inc()
        if status != "ok":
            return
        self.e2e.labels(label).observe(end - arrival)
        if first_token is not None:
            self.ttft.labels(label).observe(first_token - arrival)
            if generated > 1:
                self.tpot.labels(label).observe((end - first_token) / (generated - 1))
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.generated_tokens.labels(label).inc(generated)

    def set_lora_info(self, running: list[str], waiting: list[str], max_lora: int) -> None:
        labels = (",".join(sorted(running)), ",".join(sorted(waiting)), str(max_lora))
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                self.lora_info.remove(*self._lora_labels)
            self._lora_labels = labels
        self.lora_info.labels(*labels).set(time.time())

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server; returns the bound port (port 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
