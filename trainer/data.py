"""Training data: JSONL rows checked line by line, a seeded split, and weighted multi-task mixing.

A row is one of three shapes:

- ``{"instruction": ..., "input": ... (optional), "output": ...}``: rendered through an
  instruction template (templates.py);
- ``{"prompt": ..., "completion": ...}``: the prompt is used as written;
- ``{"messages": [{"role", "content"}, ...]}``: a chat whose last turn is the assistant's answer.

The loss is taken on the answer (``output``, ``completion`` or the last assistant turn) only.
A row that fits none of these stops loading with its file, line number and what is wrong.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SHAPES = ({"instruction", "output"}, {"prompt", "completion"}, {"messages"})
OPTIONAL = {"instruction": {"input"}}
ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """Unusable training data; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One row, normalised. Exactly one of (instruction), (prompt) or (messages) is set."""

    answer: str
    instruction: str | None = None
    input: str = ""
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # the turns before the answer
    task: str = ""

    def to_row(self) -> dict:
        """The row as it would be written in a JSONL file."""
        if self.instruction is not None:
            row = {"instruction": self.instruction, "output": self.answer}
            if self.input:
                row["input"] = self.input
            return row
        if self.prompt is not None:
            return {"prompt": self.prompt, "completion": self.answer}
        turns = [{"role": r, "content": c} for r, c in self.messages or ()]
        return {"messages": turns + [{"role": "assistant", "content": self.answer}]}


def _text(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: '{key}' is empty")
    return value


def parse_row(obj: object, where: str, task: str = "") -> Example:
    """One decoded JSON value -> Example; raises DataError prefixed with `where` ("file:line")."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    for shape in SHAPES:
        if shape <= keys:
            extra = keys - shape - OPTIONAL.get(min(shape), set())
            if extra:
                raise DataError(f"{where}: unknown field(s) {', '.join(sorted(extra))} in a "
                                f"{'/'.join(sorted(shape))} row")
            break
    else:
        raise DataError(f"{where}: a row needs 'instruction' and 'output', 'prompt' and 'completion', "
                        f"or 'messages'; got {', '.join(sorted(keys)) or 'no fields'}")
    if "messages" in shape:
        answer, turns = _messages(obj["messages"], where)
        return Example(answer, messages=turns, task=task)
    if "prompt" in shape:
        return Example(_text(obj, "completion", where), prompt=_text(obj, "prompt", where), task=task)
    inp = _text(obj, "input", where, allow_empty=True) if "input" in obj else ""
    return Example(_text(obj, "output", where), instruction=_text(obj, "instruction", where), input=inp, task=task)


def _messages(turns: object, where: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """-> (the last assistant turn, the turns before it)."""
    if not isinstance(turns, list) or len(turns) < 2:
        raise DataError(f"{where}: 'messages' must be a list of at least two turns")
    parsed = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise DataError(f"{where}: messages[{i}] must be an object with exactly 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {turn['role']!r}; roles are {', '.join(sorted(ROLES))}")
        if not isinstance(turn["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        parsed.append((turn["role"], turn["content"]))
    if parsed[-1][0] != "assistant" or not parsed[-1][1].strip():
        raise DataError(f"{where}: the last message must be a non-empty assistant turn (the answer trained on)")
    if not any(role == "user" for role, _ in parsed[:-1]):
        raise DataError(f"{where}: 'messages' has no user turn before the answer")
    return parsed[-1][1], tuple(parsed[:-1])


def load_jsonl(path: str | Path, task: str | None = None) -> list[Example]:
    """Every row of a JSONL file (blank lines skipped); the first bad row raises DataError."""
    path = Path(path)
    task = task if task is not None else path.stem
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    examples = []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        examples.append(parse_row(obj, where, task))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def write_jsonl(path: Path, examples: list[Example]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_row(), ensure_ascii=False) + "\n")


def parse_data_arg(value: str) -> tuple[str, float]:
    """`FILE[:WEIGHT]` -> (file, weight); a colon followed by a non-number stays in the path."""
    path, sep, weight = value.rpartition(":")
    if sep:
        try:
            w = float(weight)
        except ValueError:
            return value, 1.0
        if not w > 0:
            raise ValueError(f"the mixing weight in {value!r} must be positive")
        return path, w
    return value, 1.0


def split(examples: list[Example], seed: int, val: float = 0.1, test: float = 0.1
          ) -> tuple[list[Example], list[Example], list[Example]]:
    """A seeded (train, validation, test) split; validation and test get at least one row each
    when there are at least three rows."""
    rows = list(examples)
    random.Random(seed).shuffle(rows)
    n = len(rows)
    n_val = max(1, round(n * val)) if n >= 3 else 0
    n_test = max(1, round(n * test)) if n >= 3 else 0
    return rows[n_val + n_test:], rows[:n_val], rows[n_val:n_val + n_test]


def mix(tasks: list[tuple[list[Example], float]], seed: int, size: int | None = None) -> list[Example]:
    """Draw `size` examples (default: all tasks' rows together) across tasks by weight.

    Each draw picks a task with probability weight / sum(weights), then that task's next row
    in a seeded shuffle (reshuffled when used up), so a heavy task repeats its rows instead of
    crowding the others out and every task's rows are covered evenly.
    """
    tasks = [(rows, w) for rows, w in tasks if rows]
    if not tasks:
        return []
    rng = random.Random(seed)
    size = sum(len(rows) for rows, _ in tasks) if size is None else size
    orders: list[list[Example]] = [[] for _ in tasks]
    weights = [w for _, w in tasks]
    out = []
    for _ in range(size):
        i = rng.choices(range(len(tasks)), weights=weights)[0]
        if not orders[i]:
            orders[i] = list(tasks[i][0])
            rng.shuffle(orders[i])
        out.append(orders[i].pop())
    return out
