"""Trainer fixtures: a small task the tiny model can learn, written as JSONL, and a way to run
`loraplex train` in-process (the CLI's own `main`, so flags, files and exit codes are real)."""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

WORDS = "the quick brown fox jumps over lazy dog hello world".split()
INSTRUCTION = "Reverse the order of the words."


def reverse_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rows.append({"instruction": INSTRUCTION, "input": " ".join(words), "output": " ".join(reversed(words))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def task_file(tmp_path_factory) -> Path:
    """60 rows of a word-reversal task over the tiny tokenizer's vocabulary."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "reverse.jsonl", reverse_rows(60, seed=0))


@pytest.fixture(scope="session")
def run_train():
    """run_train(*argv) -> exit status of `loraplex train` run in this process."""
    from loraplex.trainer.train import main

    def run(*argv: str) -> int:
        return main([str(a) for a in argv])

    return run


@pytest.fixture(scope="session")
def trainer_data() -> SimpleNamespace:
    return SimpleNamespace(reverse_rows=reverse_rows, write_jsonl=write_jsonl, instruction=INSTRUCTION)
