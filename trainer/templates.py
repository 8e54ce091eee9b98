"""Instruction templates: several phrasings of one instruction, as FLAN does.

A template file (see templates/flan.txt) holds phrasings separated by lines of ``%%``; each is a
``str.format`` string with the fields ``{instruction}`` and ``{input}``, once each. One
phrasing is drawn per training example (seeded by the example's index, so a resumed run draws
the same ones); the first phrasing is the one the adapter is served with. `served_template`
turns it into the endpoint template loraplex serves (only ``{input}`` left open), so the
prompts served are the prompts trained on.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from string import Formatter

BUILTIN_DIR = Path(__file__).parent / "templates"
SEPARATOR = "%%"
FIELDS = {"instruction", "input"}


class TemplateError(ValueError):
    """A template that cannot be used; the message names the file and the phrasing."""


@dataclass(frozen=True)
class Template:
    name: str
    phrasings: tuple[str, ...]

    @property
    def served(self) -> str:
        """The phrasing used at serving time (and for evaluation)."""
        return self.phrasings[0]

    def pick(self, seed: int, index: int) -> str:
        """The phrasing drawn for example `index` (deterministic in seed and index)."""
        if len(self.phrasings) == 1:
            return self.phrasings[0]
        return random.Random(f"{seed}:{index}").choice(self.phrasings)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))


def load_template(name_or_file: str) -> Template:
    """A built-in template by name (flan, plain) or a template file by path."""
    path = Path(name_or_file)
    if not path.is_file():
        builtin = BUILTIN_DIR / f"{name_or_file}.txt"
        if "/" in name_or_file or not builtin.is_file():
            raise TemplateError(f"no template file {name_or_file!r} and no built-in template of that name "
                                f"(built-in: {', '.join(builtin_names())})")
        path = builtin
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read template {path}: {exc}") from None
    return parse_template(text, path.stem if path.parent == BUILTIN_DIR else str(path))


def parse_template(text: str, name: str) -> Template:
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.strip() == SEPARATOR:
            blocks.append([])
        else:
            blocks[-1].append(line)
    phrasings = tuple("\n".join(b).strip("\n") for b in blocks)
    for i, phrasing in enumerate(phrasings, 1):
        check_phrasing(phrasing, f"template {name}, phrasing {i}")
    return Template(name, phrasings)


def _fields(phrasing: str, where: str) -> list[str]:
    try:
        parts = list(Formatter().parse(phrasing))
    except ValueError as exc:
        raise TemplateError(f"{where}: {exc}; write literal braces as '{{{{' and '}}}}'") from None
    fields = []
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in FIELDS or spec or conversion:
            raise TemplateError(f"{where}: unknown field {{{field}}}; the fields are {{instruction}} and {{input}}")
        fields.append(field)
    return fields


def check_phrasing(phrasing: str, where: str) -> None:
    if not phrasing.strip():
        raise TemplateError(f"{where}: empty phrasing")
    fields = _fields(phrasing, where)
    if fields.count("instruction") != 1 or fields.count("input") != 1:
        raise TemplateError(f"{where}: a phrasing needs {{instruction}} and {{input}} exactly once each")


def render(phrasing: str, instruction: str, input_text: str = "") -> str:
    """The prompt text of one instruction row (a row without input leaves the slot empty)."""
    return phrasing.format(instruction=instruction, input=input_text).strip()


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def served_template(phrasing: str, instruction: str) -> str:
    """The endpoint template for `instruction`: `phrasing` with the instruction written in and
    only ``{input}`` open, in the endpoint rule (literal braces doubled).
    served_template(p, i).format(input=x) == render(p, i, x) for any non-empty x."""
    out = []
    for literal, field, _, _ in Formatter().parse(phrasing):
        out.append(_escape(literal))
        if field == "instruction":
            out.append(_escape(instruction))
        elif field == "input":
            out.append("{input}")
    return "".join(out).strip()
