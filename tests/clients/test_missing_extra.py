"""`loraplex SUBCOMMAND` on an install without the subcommand's extra: one line naming what is
missing and the install command, exit status 2, no traceback.

Each case runs the installed `loraplex` command in a subprocess in which the extra's modules are
made absent: a `sitecustomize` on PYTHONPATH wraps every import finder so that it finds nothing
for the hidden names, which is what Python sees when a distribution is not installed
(`importlib.util.find_spec` returns None, `import` raises ModuleNotFoundError). A second form, a
module on PYTHONPATH that raises ModuleNotFoundError when imported, is found but fails on import:
it drives the path that catches the error instead of the look-up before the run.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from loraplex.clients.cli import EXTRAS, NEEDS, SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[2]
LORAPLEX = Path(sys.executable).with_name("loraplex")
HIDE = """\
import os
import sys

HIDDEN = tuple(filter(None, os.environ.get("LORAPLEX_TEST_HIDDEN", "").split(",")))


def hidden(name):
    return any(name == h or name.startswith(h + ".") for h in HIDDEN)


class Hiding:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        return None if hidden(name) else self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
"""


def run_cli(tmp_path: Path, args: list[str], hidden: Iterable[str] = (), shims: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
    """The installed `loraplex ARGS` with `hidden` modules absent and `shims` (module -> source)
    importable, in `tmp_path` (so nothing of the checkout is on sys.path)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE)
    for module, source in (shims or {}).items():
        (site / f"{module}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(site), "LORAPLEX_TEST_HIDDEN": ",".join(hidden)}
    assert LORAPLEX.is_file(), f"the installed loraplex command ({LORAPLEX}) is missing"
    return subprocess.run([str(LORAPLEX), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def modules(extra: str, without: str | None = None) -> list[str]:
    """The modules of `extra`, less those of the extra `without` (what a narrower install has)."""
    kept = set(EXTRAS[without].values()) if without else set()
    return [m for m in EXTRAS[extra].values() if m not in kept]


TRAIN_LINE = ("loraplex {cmd}: peft, rouge-score, sacrebleu are not installed (the train extra); "
              "install it with: scripts/install.sh train")
BENCH_LINE = ("loraplex bench: peft, matplotlib are not installed (the bench extra); "
              "install it with: scripts/install.sh bench")
SERVE_LINE = ("loraplex {cmd}: torch, numpy, transformers, tokenizers, safetensors, gguf, sentencepiece, jinja2, "
              "bitsandbytes, prometheus-client, grpcio-health-checking, grpcio-reflection, aiohttp, regex, accelerate "
              "are not installed (the serve extra); install it with: scripts/install.sh serve")


@pytest.mark.parametrize("args, hidden, line", [
    # a serve-only install
    (["train", "--method", "lora", "--data", "task.jsonl", "--out", "out"], modules("train", "serve"),
     TRAIN_LINE.format(cmd="train")),
    (["eval", "--data", "test.jsonl"], modules("train", "serve"), TRAIN_LINE.format(cmd="eval")),
    (["bench", "--quick"], modules("bench", "serve"), BENCH_LINE),
    # a client-only install
    (["serve"], modules("serve"), SERVE_LINE.format(cmd="serve")),
    (["generate", "--input", "requests.jsonl"], modules("serve"), SERVE_LINE.format(cmd="generate")),
    (["merge", "--adapter", "a", "--out", "b"], modules("serve"), SERVE_LINE.format(cmd="merge")),
], ids=["train", "eval", "bench", "serve", "generate", "merge"])
def test_missing_extra_is_one_line_and_exit_2(tmp_path, args, hidden, line):
    proc = run_cli(tmp_path, args, hidden)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", line + "\n")


def test_a_module_that_fails_on_import_is_reported_the_same_way(tmp_path):
    """Found by the look-up, missing on import (the ModuleNotFoundError is caught for the extra's
    own modules only)."""
    shim = 'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n'
    proc = run_cli(tmp_path, ["serve", "--port", "0"], shims={"torch": shim})
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("loraplex serve: torch is not installed (the serve extra); "
                           "install it with: scripts/install.sh serve\n")


def test_a_missing_module_of_loraplex_itself_still_raises(tmp_path):
    proc = run_cli(tmp_path, ["train", "--help"], hidden=["loraplex.trainer.methods"])
    assert proc.returncode == 1 and proc.stderr.startswith("Traceback"), proc.stderr
    assert proc.stderr.rstrip().endswith("ModuleNotFoundError: No module named 'loraplex.trainer.methods'")


@pytest.mark.parametrize("name", [n for n in SUBCOMMANDS if n not in NEEDS])
def test_subcommands_without_an_extra_run_on_the_client_install(tmp_path, name):
    """A subcommand left out of NEEDS must work with every extra's modules absent."""
    hidden = sorted({m for extra in EXTRAS for m in EXTRAS[extra].values()})
    proc = run_cli(tmp_path, [name, "--help"], hidden)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: loraplex {name}")


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()


def _pyproject_extra(extras: dict[str, list[str]], extra: str) -> set[str]:
    names: set[str] = set()
    for requirement in extras[extra]:
        nested = re.fullmatch(r"loraplex\[(\w+)\]", requirement)
        names |= _pyproject_extra(extras, nested[1]) if nested else {_name(requirement)}
    return names


def test_extras_match_pyproject():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, table in EXTRAS.items():
        assert {_name(dist) for dist in table} == _pyproject_extra(extras, extra), extra
    assert set(NEEDS.values()) <= set(EXTRAS) and set(NEEDS) <= set(SUBCOMMANDS)


def test_each_module_belongs_to_its_distribution():
    installed = packages_distributions()
    for table in EXTRAS.values():
        for dist, module in table.items():
            assert _name(dist) in {_name(d) for d in installed.get(module, [])}, (dist, module)
