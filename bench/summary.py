"""The suite's summary: machine, command, date, then each scenario's section."""
from __future__ import annotations

import platform
from pathlib import Path

from .report import markdown


def summary(results: list[dict], image_prefix: str = "") -> str:
    """Each result carries the command and date that made it (a scenario may be rerun alone)."""
    m = results[0]["machine"] if results else {}
    failed = [c["name"] for r in results for c in r["checks"] if c["passed"] is False]
    runs: dict[str, list[dict]] = {}
    for r in results:
        runs.setdefault(r.get("command", "?"), []).append(r)
    lines = [
        "Commands: " + "; ".join(
            f"`{cmd}` ({', '.join(r['scenario'] for r in rs)}, {sum(r['seconds'] for r in rs) / 60:.1f} min, "
            f"{rs[-1].get('date', '?')})" for cmd, rs in runs.items()) + ".",
        f"Machine: {platform.machine()}, {m.get('cpus')} CPUs, {m.get('threads')} torch threads, "
        f"GPU: {m.get('gpu') or 'none'}; torch {m.get('torch')}, Python {m.get('python')}; "
        f"load average at the end {m.get('load_average', 0):.1f}. Model: `{Path(m.get('model', '')).name}`, "
        f"{_base(m)}, on {m.get('device', 'cpu')}.",
        "",
        f"Checks not met: {len(failed)} of {sum(len(r['checks']) for r in results)}.",
        "",
    ]
    for r in results:
        lines += [markdown(r, image_prefix), ""]
    return "\n".join(lines)


def update_docs(path: Path, text: str, start: str, end: str) -> None:
    """Replace what lies between the markers in `path`, leaving the rest as it is."""
    doc = path.read_text()
    head, _, rest = doc.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def _base(machine: dict) -> str:
    quantize = machine.get("quantize", "none")
    return "float32" if quantize == "none" else f"{quantize} base (float32 compute)"

