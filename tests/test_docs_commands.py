"""The documentation cannot drift from the command line.

Every `loraplex ...` command line in README.md and docs/*.md (fenced blocks, and inline code
spans that carry arguments) is parsed by the real argument parser of its subcommand, built with
`loraplex.clients.cli.build_parser` and never run; `.venv/bin/loraplex`, `python -m
loraplex.clients.cli` and `python -m loraplex.<subcommand's module>` (also under `accelerate
launch`) count as the same command. Lines that are not meant to be typed as they stand are
skipped, each with its reason in `skip_reason`. Then the README's "Serving adapters" block runs
as written, command by command, against a real `loraplex serve` on the tiny test model with the
adapters it names built in the test; only the server's address is put in for 127.0.0.1:50051.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraplex.clients.cli import SUBCOMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LORAPLEX = Path(sys.executable).with_name("loraplex")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SHELL = {"", "bash", "sh", "shell", "console"}  # fenced blocks of command lines (not python, yaml, ...)
SPAN = re.compile(r"`([^`]+)`")
SPAN_COMMAND = re.compile(r"(\.venv/bin/)?loraplex |(\.venv/bin/)?python3? -m loraplex\.|accelerate launch ")
OPERATORS = {"&&", "||", ";", "|", "&"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
MODULES = {target: name for name, (target, _) in SUBCOMMANDS.items() if ":" not in target}  # module -> subcommand
README_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class DocLine:
    where: str  # FILE:LINE
    text: str  # continuations joined
    inline: bool  # an inline code span, not a fenced block's line


def _fenced_lines(name: str, text: str) -> list[DocLine]:
    lines = []
    for block in FENCE.finditer(text):
        if block[1].strip() not in SHELL:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        pending, start = "", first
        for offset, raw in enumerate(block[2].splitlines()):
            if not pending:
                start = first + offset
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            joined, pending = (pending + raw).strip(), ""
            if joined and not joined.startswith("#"):
                lines.append(DocLine(f"{name}:{start}", joined, inline=False))
    return lines


def _inline_spans(name: str, text: str) -> list[DocLine]:
    prose = FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)  # keeps line numbers
    return [DocLine(f"{name}:{prose.count(chr(10), 0, m.start()) + 1}", " ".join(m[1].split()), inline=True)
            for m in SPAN.finditer(prose) if SPAN_COMMAND.match(" ".join(m[1].split()))]


def doc_lines() -> list[DocLine]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        found += _fenced_lines(path.name, text) + _inline_spans(path.name, text)
    return found


def _segments(text: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ;, | and &), comments dropped."""
    segments: list[list[str]] = [[]]
    for token in shlex.split(text, comments=True):
        if token in OPERATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def loraplex_command(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(subcommand, its arguments) when `tokens` run the loraplex command; the subcommand is
    "python -m MODULE" for a loraplex module that is no subcommand."""
    if tokens[0] in ("loraplex", ".venv/bin/loraplex") and len(tokens) > 1:
        return tokens[1], tokens[2:]
    if tokens[:2] == ["accelerate", "launch"]:
        tokens = ["python", *tokens[2:]]
    if tokens[0] in PYTHONS and len(tokens) > 2 and tokens[1] == "-m" and tokens[2].startswith("loraplex."):
        module, rest = tokens[2], tokens[3:]
        if module == "loraplex.clients.cli":
            return (rest[0], rest[1:]) if rest else ("", [])
        return MODULES.get(module, f"python -m {module}"), rest
    return None


def skip_reason(line: DocLine, name: str, args: list[str]) -> str | None:
    """Why a documented command line is not parsed as it stands; None when it is."""
    if name.startswith("python -m "):
        return "a benchmark module run directly: its own parser, inside its main(), not a loraplex subcommand"
    if any(a.startswith("[") or "|" in a for a in args):
        return "a usage synopsis ([optional] parts, A|B alternatives), not a command line"
    if any("..." in a for a in args):
        return "arguments elided with '...'"
    if any(a.startswith("(") for a in args):
        return "arguments replaced by prose in parentheses"
    if line.inline and not args:
        return "prose naming the subcommand, not a command line"
    return None


def classify() -> tuple[list[tuple[DocLine, str, list[str]]], list[tuple[DocLine, str]]]:
    """(command lines to parse, skipped lines with the reason)."""
    parse, skipped = [], []
    for line in doc_lines():
        if "loraplex" not in line.text:
            continue
        for tokens in _segments(line.text):
            command = loraplex_command(tokens)
            if command is None:
                continue
            reason = skip_reason(line, *command)
            if reason:
                skipped.append((line, reason))
            else:
                parse.append((line, *command))
    return parse, skipped


PARSE, SKIPPED = classify()


@pytest.mark.parametrize("line, name, args", PARSE, ids=[line.where for line, _, _ in PARSE])
def test_documented_command_parses(line, name, args, capsys):
    assert name in SUBCOMMANDS, f"{line.where}: {line.text!r} names no loraplex subcommand {name!r}"
    try:
        build_parser(name).parse_args(args)
    except SystemExit as exc:  # argparse printed the usage error (2), or the help asked for (0)
        assert exc.code in (0, None), f"{line.where}: {line.text!r}\n{capsys.readouterr().err}"


def test_the_docs_commands_are_found():
    """The extraction itself: a change that hid every command from the test would pass it."""
    parsed = {line.where.partition(":")[0] for line, _, _ in PARSE}
    assert {"README.md", "BENCHMARKS.md", "SCALE_OUT.md", "TRAINING.md"} <= parsed
    names = {name for _, name, _ in PARSE}
    assert {"serve", "adapters", "endpoints", "complete", "generate", "merge", "train", "eval", "bench"} <= names
    serving = [line.text for line, _, _ in PARSE if line.text in readme_serving_block()]
    assert serving == readme_serving_block()


def readme_serving_block() -> list[str]:
    """The command lines of the README's "Serving adapters" block, continuations joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Serving adapters"):]
    block = FENCE.search(section)
    return [line.text for line in _fenced_lines("README.md", block[0])]


READY = re.compile(r"loraplex serving .* on (?P<host>[\d.]+):(?P<port>\d+) \(metrics on ")


def start_server(model: Path, store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`loraplex serve` on free ports, started in a directory of the test's own; (process, HOST:PORT)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([str(LORAPLEX), "serve", "--model", str(model), "--store", str(store), "--port", "0",
                                 "--metrics-port", "0", "--threads", "1", "--block-size", "4",
                                 "--max-total-tokens", "4096"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not (match := READY.search(log.read_text(errors="replace"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"server not ready:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    return proc, f"{match['host']}:{match['port']}"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains and exits 0), then SIGKILL if it has not gone within a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_readme_serving_block_runs_as_written(tmp_path, tiny_model, builders):
    """The commands run in a directory laid out as the README assumes: ./adapters/sql-lora (a
    LoRA), ./adapters/polite-prompt (a soft prompt) and .venv/bin/loraplex (the installed
    command)."""
    commands = readme_serving_block()
    assert commands and all(c.startswith(".venv/bin/loraplex ") and README_ADDRESS in c for c in commands), commands
    builders.lora(tiny_model, tmp_path / "adapters" / "sql-lora", ["q_proj", "v_proj"], r=4, alpha=8, seed=1)
    builders.soft_prompt(tiny_model, tmp_path / "adapters" / "polite-prompt", num_virtual=4, seed=2)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "loraplex").symlink_to(LORAPLEX)
    (tmp_path / "server").mkdir()
    proc, address = start_server(tiny_model, tmp_path / "server" / "store", tmp_path / "server" / "serve.log")
    try:
        for command in commands:
            done = subprocess.run(["bash", "-c", command.replace(README_ADDRESS, address)], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (f"{command}\n{done.stdout}{done.stderr}\nserver log:\n"
                                          f"{(tmp_path / 'server' / 'serve.log').read_text(errors='replace')[-3000:]}")
    finally:
        stop(proc)
    answer = json.loads(done.stdout)
    assert answer["text"] and answer["adapter"] == "sql@1", answer
