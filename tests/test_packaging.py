"""The repository root never shadows installed packages (DESIGN.md): the folders `kernels/` and
`server/` are only importable as `loraplex.kernels` / `loraplex.server`."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _inside_repo(path: str | None) -> bool:
    if path is None:
        return False
    try:
        Path(path).resolve().relative_to(REPO)
    except ValueError:
        return False
    return True


def test_repo_root_is_this_checkout():
    assert (REPO / "kernels" / "__init__.py").is_file() and (REPO / "server" / "__init__.py").is_file()


@pytest.mark.parametrize("name", ["kernels", "server"])
def test_top_level_name_does_not_resolve_into_the_checkout(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    locations = [spec.origin, *(spec.submodule_search_locations or [])]
    assert not any(_inside_repo(p) for p in locations), (
        f"import {name!r} resolves into the checkout ({locations}); the repository root is on sys.path"
    )


@pytest.mark.parametrize("name,folder", [("loraplex.kernels", "kernels"), ("loraplex.server", "server"),
                                         ("loraplex.server.engine", "server/engine")])
def test_loraplex_packages_import_from_the_repo_folders(name, folder):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve() == (REPO / folder / "__init__.py").resolve()
