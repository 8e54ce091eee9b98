"""Fixtures for the registry tests: the engine's real validator and a fresh store per test."""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loraplex.adapters_store import AdapterStore


@pytest.fixture(scope="session")
def validate(tiny_model) -> Callable[[Path], dict]:
    """The server's validation callback: PEFT config, safetensors header and shapes vs the tiny Llama."""
    import transformers

    from loraplex.server.engine.adapters import BaseModelShape, inspect_adapter

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
