"""Fixtures for the registry tests: the engine's real validator, a fresh store per test, the
`loraplex` command as a subprocess, snapshots of a directory tree, and extra PostgreSQL databases."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loraplex.adapters_store import AdapterStore


@pytest.fixture(scope="session")
def validate(tiny_model) -> Callable[[Path], dict]:
    """The server's validation callback: PEFT config, safetensors header and shapes vs the tiny Llama."""
    import transformers

    from loraplex.server.engine.adapter_format import BaseModelShape
    from loraplex.server.engine.adapters import inspect_adapter

    shape = BaseModelShape.from_hf_config(transformers.AutoConfig.from_pretrained(tiny_model))
    return lambda d: inspect_adapter(d, shape, max_rank=64)


@pytest.fixture
def store(tmp_path) -> Iterator[AdapterStore]:
    s = AdapterStore(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def copy_adapter(tiny_adapters, tmp_path) -> Callable[[str], Path]:
    """A private copy of one of the session's adapters, free to be damaged by the test."""
    def copy(key: str, dest: str | None = None) -> Path:
        return Path(shutil.copytree(tiny_adapters[key], tmp_path / "src" / (dest or key)))

    return copy


@pytest.fixture
def loraplex_cli() -> Callable[..., subprocess.CompletedProcess]:
    """run(*args) -> the finished `loraplex ARGS...` process, a real one (stdout and stderr apart)."""
    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "loraplex.clients.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout)

    return run


@pytest.fixture
def tree() -> Callable[..., dict[str, tuple]]:
    """snapshot(*roots) -> every file and directory under the roots, with each file's size, mode,
    modification time and sha256: equal snapshots mean nothing was created, changed or removed."""
    def snapshot(*roots: Path) -> dict[str, tuple]:
        found: dict[str, tuple] = {}
        for root in roots:
            for path in sorted(Path(root).rglob("*")):
                st = path.lstat()
                found[str(path)] = ("dir",) if path.is_dir() else (
                    st.st_size, st.st_mode, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        return found

    return snapshot


@pytest.fixture
def new_database(postgres_server) -> Iterator[Callable[[], str]]:
    """make() -> the URL of another fresh, empty database on the test server (dropped afterwards),
    for a test that needs a second registry (an empty one, a mistyped one)."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    made: list[str] = []

    def make() -> str:
        name = f"loraplex_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return urlunsplit(urlsplit(postgres_server)._replace(path=f"/{name}"))

    yield make
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
