"""The repository root never shadows installed packages (DESIGN.md): the folders `kernels/` and
`server/` are only importable as `loraplex.kernels` / `loraplex.server`.

transformers 5 imports Hugging Face's own `kernels` distribution, so a top-level `kernels/`
holding an `__init__.py` breaks every Python started in the checkout's root. The LoRA ops live in
`kernels/lora/` (mapped to `loraplex.kernels`) and `kernels/` itself is no package. The
subprocess tests below start Python in the repository root, where '' (the current directory)
leads `sys.path`, once through the editable install and once through the wheel.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run in the repository root: the imports that broke when `kernels/` shadowed Hugging Face's.
ROOT_IMPORTS = """
import kernels, transformers.modeling_utils, transformers.integrations.hub_kernels, bitsandbytes
import loraplex.kernels, loraplex.server.engine.engine
assert "site-packages" in kernels.__file__, f"kernels is not Hugging Face's: {kernels.__file__}"
print(loraplex.kernels.__file__)
"""


def _inside_repo(path: str | None) -> bool:
    """In the checkout's own folders (a virtual environment inside the checkout does not count)."""
    if path is None:
        return False
    resolved = Path(path).resolve()
    return resolved.is_relative_to(REPO) and not resolved.is_relative_to(Path(sys.prefix).resolve())


def test_repo_root_is_this_checkout():
    assert (REPO / "kernels" / "lora" / "__init__.py").is_file() and (REPO / "server" / "__init__.py").is_file()
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must not be a package (it shadows HF kernels)"


@pytest.mark.parametrize("name", ["kernels", "server"])
def test_top_level_name_does_not_resolve_into_the_checkout(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    locations = [spec.origin, *(spec.submodule_search_locations or [])]
    assert not any(_inside_repo(p) for p in locations), (
        f"import {name!r} resolves into the checkout ({locations}); the repository root is on sys.path"
    )


@pytest.mark.parametrize("name,folder", [("loraplex.kernels", "kernels/lora"), ("loraplex.server", "server"),
                                         ("loraplex.server.engine", "server/engine")])
def test_loraplex_packages_import_from_the_repo_folders(name, folder):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve() == (REPO / folder / "__init__.py").resolve()


def _run_in_repo_root(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_python_in_the_repo_root_imports_transformers_and_loraplex():
    """The editable install: `python -c` in the checkout's root (cwd first on sys.path)."""
    done = _run_in_repo_root(["-c", ROOT_IMPORTS])
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()).resolve() == (REPO / "kernels/lora/__init__.py").resolve()


@pytest.mark.slow
def test_a_documented_python_m_command_runs_in_the_repo_root(tiny_model, tmp_path):
    """`python -m loraplex.bench.engine_throughput` as docs/BENCHMARKS.md shows it, on the tiny model
    (it imports transformers, peft and bitsandbytes, the chain the shadowing broke)."""
    done = _run_in_repo_root(["-m", "loraplex.bench.engine_throughput", "--model", str(tiny_model),
                              "--requests", "2", "--new-tokens", "2", "--adapters", "2", "--rank", "4",
                              "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PEFT" in done.stdout


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory) -> Path:
    """loraplex's wheel, built from this checkout and unpacked (a wheel's install is its unpacking,
    plus metadata and scripts that these imports do not use)."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy, so setuptools' build/ and egg-info never land in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(out / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300, cwd=out)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (out / "dist").glob("loraplex-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(out / "site")
    assert "loraplex/kernels/lora_torch.py" in names and not any(n.startswith("kernels/") for n in names)
    return out / "site"


def test_the_wheel_imports_in_the_repo_root(unpacked_wheel):
    """The wheel install: no site processing (`-S`, so the editable install's finder never loads);
    the unpacked wheel and the dependencies' site-packages on PYTHONPATH; cwd the checkout."""
    deps = sysconfig.get_paths()["purelib"]
    done = _run_in_repo_root(["-S", "-c", ROOT_IMPORTS],
                             env={"PYTHONPATH": os.pathsep.join([str(unpacked_wheel), deps])})
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()).resolve() == (unpacked_wheel / "loraplex/kernels/__init__.py").resolve()
