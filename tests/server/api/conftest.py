"""A real `loraplex serve` process on the tiny model, and real gRPC clients to talk to it.

Fixtures:
- `server_factory` (per test) and `module_server_factory` (per module): start(*extra_args,
  store=None, name=..., model=None, adapter_roots=None) -> ServerProcess, each on a store of its
  own unless `store` names one (a restart passes the same one), on `tiny_model` unless `model`
  names another, registering by path inside the system's temporary directory unless
  `adapter_roots` says otherwise; every server they started is stopped at teardown.
- `long_model`: `tiny_model`'s weights with a 2048-token context, for streams that must still
  be running while a test acts (a signal, a deadline).
- `api`: small helpers shared by the test modules (scrape and parse /metrics, health checks,
  polling), as a namespace because test modules cannot import this file.
- `fuzz_store` and `fuzz_engine` (per module): the registry and the tiny model's engine that the
  Hypothesis fuzz tests (test_fuzz_*.py, kserve_tensors_fuzz.py) resolve and encode requests against.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from loraplex.adapters_store import AdapterStore
    from loraplex.server.engine.engine import Engine

READY = re.compile(r"loraplex serving .* on (?P<host>[\d.]+):(?P<port>\d+) \(metrics on [\d.]+:(?P<metrics>\d+)\)"
                   r"(?: \(OpenAI HTTP on [\d.]+:(?P<http>\d+)\))?")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    store: Path
    log: Path
    http_port: int | None = None  # with --http-port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (`openai.OpenAI(base_url=...)`)."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model: Path, store: Path, log: Path, *extra: str, timeout: float = 120,
                 adapter_roots: tuple[Path, ...] | None = None) -> ServerProcess:
    """Start `loraplex serve` on free ports and wait for its ready line. Adapters inside
    `adapter_roots` may be registered by server path; by default that is the system's temporary
    directory, where pytest makes every test's files; `()` gives a server that takes uploads only."""
    roots = (Path(tempfile.gettempdir()),) if adapter_roots is None else adapter_roots
    cmd = [sys.executable, "-m", "loraplex.clients.cli", "serve", "--model", str(model), "--store", str(store),
           "--port", "0", "--metrics-port", "0", "--block-size", "4", "--max-total-tokens", "8192",
           "--threads", "1", *(arg for root in roots for arg in ("--adapter-root", str(root))), *extra]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(log.parent),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out.close()  # the child holds its own copy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            http = int(match["http"]) if match["http"] else None
            return ServerProcess(proc, int(match["port"]), int(match["metrics"]), store, log, http)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text(errors='replace')}")


class _Servers:
    def __init__(self, model: Path, root: Path) -> None:
        self.model = model
        self.root = root
        self.started: list[ServerProcess] = []

    def start(self, *extra: str, store: Path | None = None, name: str = "server",
              model: Path | None = None, adapter_roots: tuple[Path, ...] | None = None) -> ServerProcess:
        n = len(self.started)
        server = start_server(model or self.model, store or self.root / f"{name}-{n}-store",
                              self.root / f"{name}-{n}.log", *extra, adapter_roots=adapter_roots)
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()


@pytest.fixture
def server_factory(tmp_path, tiny_model):
    """start(*extra_args, store=None, name=..., model=None) -> ServerProcess; stopped at teardown."""
    servers = _Servers(tiny_model, tmp_path)
    yield servers.start
    servers.stop_all()


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory, tiny_model):
    """As `server_factory`, for servers shared by the tests of one module."""
    servers = _Servers(tiny_model, tmp_path_factory.mktemp("servers"))
    yield servers.start
    servers.stop_all()


@pytest.fixture(scope="session")
def long_model(tmp_path_factory, builders) -> Path:
    """The tiny model again (same seed, same shapes, so the same weights) with a longer context."""
    return builders.llama(tmp_path_factory.mktemp("long-llama"), max_position_embeddings=2048)


# ----------------------------------------------------------------------------- helpers


def scrape(server: ServerProcess) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode("utf-8")


def samples(text: str) -> list:
    """Every sample of a /metrics exposition (prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`; 0 when none match
    (a counter child that was never incremented is not exported)."""
    return sum(s.value for s in samples(text)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def label_values(text: str, name: str, label: str) -> set[str]:
    return {s.labels[label] for s in samples(text) if s.name == name and label in s.labels}


def health(target: str, service: str = "", timeout: float = 10) -> str:
    """grpc.health.v1 Check -> the status name ("SERVING", ...)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_until(condition, timeout: float = 10, interval: float = 0.05, what: str = "condition"):
    """Poll `condition()` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def api() -> SimpleNamespace:
    return SimpleNamespace(scrape=scrape, samples=samples, metric=metric, label_values=label_values,
                           health=health, wait_until=wait_until)


# ----------------------------------------------------------------------------- fuzzing


def _validate(tiny_model: Path) -> Callable[[Path], dict]:
    """The server's validation callback (as tests/adapters_store/conftest.py's `validate`)."""
    import transformers

    from loraplex.server.engine.adapter_format import BaseModelShape
    from loraplex.server.engine.adapters import inspect_adapter

    shape = BaseModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(tiny_model))
    return lambda d: inspect_adapter(d, shape, max_rank=64)


@pytest.fixture(scope="module")
def fuzz_store(tiny_model, tiny_adapters, tmp_path_factory) -> Iterator[AdapterStore]:
    """sql@1 and sql@2 (LoRAs), soft@1 (a soft prompt); endpoint "task" (sql@1 with sql@2 as a
    half-weight canary, the soft prompt, the template "Q: {input}\\nA:", a system message, defaults
    temperature 0.5 and max_new_tokens 32, max_new_tokens_cap 64) and endpoint "plain" (nothing
    but a name). The fuzz tests' assertions rely on these values."""
    from loraplex.adapters_store import AdapterStore
    from loraplex.adapters_store.records import EndpointRecord

    validate = _validate(tiny_model)
    store = AdapterStore(tmp_path_factory.mktemp("fuzz-store") / "store")
    store.publish_dir("sql", tiny_adapters["attn4"], validate)
    store.publish_dir("sql", tiny_adapters["mlp8"], validate)
    store.publish_dir("soft", tiny_adapters["soft"], validate)
    store.create_endpoint(EndpointRecord(name="task", adapter="sql@1", canary_adapter="sql@2", canary_weight=0.5,
                                         soft_prompt="soft@1", template="Q: {input}\nA:", system_message="Be brief.",
                                         defaults={"temperature": 0.5, "max_new_tokens": 32}, max_new_tokens_cap=64))
    store.create_endpoint(EndpointRecord(name="plain"))
    yield store
    store.close()


@pytest.fixture(scope="module")
def fuzz_engine(tiny_model, tiny_adapters) -> Engine:
    """The tiny model's engine, holding fuzz_store's versions under their refs (as serve does)."""
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    engine = Engine(EngineConfig(model=str(tiny_model), block_size=4, max_total_tokens=2048))
    for ref, key in (("sql@1", "attn4"), ("sql@2", "mlp8"), ("soft@1", "soft")):
        engine.register_adapter(ref, str(tiny_adapters[key]))
    return engine
