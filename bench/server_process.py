"""A `loraplex serve` process for the benchmarks (started on free ports, scraped, measured, stopped),
and the Admin calls the scenarios share: register adapters by server path, pin them."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a Python child of the benchmarks: PYTHONSAFEPATH keeps the working
    directory (the repository root, when the suite runs from a checkout) off its sys.path, so the
    checkout's folders cannot shadow installed packages."""
    return {**os.environ, "PYTHONSAFEPATH": "1", **extra}


READY = re.compile(r"loraplex serving .* on (?P<host>[\d.]+):(?P<port>\d+) \(metrics on [\d.]+:(?P<metrics>\d+)\)")


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> str:
        """The /metrics exposition text."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as resp:
            return resp.read().decode("utf-8")

    def rss_bytes(self) -> int:
        """Resident memory of the server process (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.proc.pid}")

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(model: Path, store: Path, log: Path, *extra: str, threads: int, adapter_root: Path,
                 timeout: float = 600) -> Server:
    """Start `loraplex serve` on free ports and wait for its ready line (the store may hold
    thousands of adapters, which it re-registers before it is ready). Adapters inside
    `adapter_root` may be registered by server path (`ensure_registered`). Without the prefix
    cache: the scenarios replay a few prompts, which would measure cache hits, not the engine under
    load (`prefix_reuse` measures the cache)."""
    cmd = [sys.executable, "-m", "loraplex.clients.cli", "serve", "--model", str(model), "--store", str(store),
           "--port", "0", "--metrics-port", "0", "--threads", str(threads), "--registry-poll-seconds", "0",
           "--log-level", "WARNING", "--no-prefix-caching", "--adapter-root", str(adapter_root), *extra]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=python_env(PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return Server(proc, int(match["port"]), int(match["metrics"]), log)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


def ensure_registered(target: str, adapters: list, prefix: str) -> None:
    """Register (by server path) whichever of `adapters` the store does not hold yet."""
    from loraplex.clients.client import Client

    with Client(target, timeout=120) as client:
        have = {a["name"] for a in client.list_adapters()}
        for i, path in enumerate(adapters):
            if f"{prefix}{i}" not in have:
                client.register_adapter(f"{prefix}{i}", str(path.resolve()))


def pin_all(target: str, n: int, prefix: str) -> None:
    from loraplex.clients.client import Client

    with Client(target, timeout=120) as client:
        for i in range(n):
            client.pin(f"{prefix}{i}")
