"""A real `loraplex serve` process on the tiny model, and real gRPC clients to talk to it."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

READY = re.compile(r"loraplex serving .* on (?P<host>[\d.]+):(?P<port>\d+) \(metrics on [\d.]+:(?P<metrics>\d+)\)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    store: Path
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model: Path, store: Path, log: Path, *extra: str, timeout: float = 120) -> ServerProcess:
    """Start `loraplex serve` on free ports and wait for its ready line."""
    cmd = [sys.executable, "-m", "loraplex.clients.cli", "serve", "--model", str(model), "--store", str(store),
           "--port", "0", "--metrics-port", "0", "--block-size", "4", "--max-total-tokens", "8192",
           "--threads", "1", *extra]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(log.parent),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return ServerProcess(proc, int(match["port"]), int(match["metrics"]), store, log)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text(errors='replace')}")


@pytest.fixture
def server_factory(tmp_path, tiny_model):
    """start(*extra_args, store=None) -> ServerProcess; every server is stopped at teardown."""
    started: list[ServerProcess] = []

    def start(*extra: str, store: Path | None = None, name: str = "server") -> ServerProcess:
        server = start_server(tiny_model, store or tmp_path / "store", tmp_path / f"{name}-{len(started)}.log", *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
