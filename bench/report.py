"""A scenario's result on disk: `<name>.json` (everything), `<name>.md` (its tables and checks)
and one PNG per plot.

A result is a plain dict:
    {"scenario", "title", "config", "machine",
     "tables": [{"title", "columns", "rows"}],
     "plots":  [{"name", "title", "xlabel", "ylabel", "series": {label: [[x, y], ...]}, "logx"}],
     "checks": [{"name", "value", "target", "passed"}],  # agreement checks and issue targets
     "notes":  [str], "data": {...}}
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def check(name: str, value: float | None, target: str, passed: bool | None) -> dict:
    """One line of a scenario's checks; `passed` None when it could not be measured."""
    return {"name": name, "value": value, "target": target, "passed": passed}


def table(title: str, columns: list[str], rows: list[list]) -> dict:
    return {"title": title, "columns": columns, "rows": rows}


def plot(name: str, title: str, xlabel: str, ylabel: str, series: dict[str, list[list[float]]],
         logx: bool = False) -> dict:
    return {"name": name, "title": title, "xlabel": xlabel, "ylabel": ylabel, "series": series, "logx": logx}


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def markdown(result: dict, image_prefix: str = "") -> str:
    """The scenario's section: tables, checks, notes and its plots (linked with `image_prefix`)."""
    lines = [f"### {result['title']}", ""]
    for t in result["tables"]:
        lines += [f"**{t['title']}**", "", "| " + " | ".join(t["columns"]) + " |",
                  "| " + " | ".join("---" for _ in t["columns"]) + " |"]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in t["rows"]]
        lines.append("")
    if result["checks"]:
        lines += ["| check | value | target | met |", "| --- | ---: | --- | --- |"]
        lines += [f"| {c['name']} | {fmt(c['value'])} | {c['target']} | {fmt(c['passed'])} |" for c in result["checks"]]
        lines.append("")
    lines += [f"- {n}" for n in result.get("notes", [])]
    if result.get("notes"):
        lines.append("")
    lines += [f"![{p['title']}]({image_prefix}{png_name(result, p)})" for p in result["plots"]]
    return "\n".join(lines).rstrip() + "\n"


def png_name(result: dict, p: dict) -> str:
    return f"{result['scenario']}-{p['name']}.png"


def draw(p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    for label, points in p["series"].items():
        points = [(x, y) for x, y in points if y is not None and not (isinstance(y, float) and math.isnan(y))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=label)
    if p.get("logx"):
        ax.set_xscale("symlog", linthresh=1)
    ax.set_title(p["title"], fontsize=10)
    ax.set_xlabel(p["xlabel"])
    ax.set_ylabel(p["ylabel"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(result: dict, out: Path) -> list[Path]:
    """Write the JSON, markdown and PNGs of one scenario into `out`; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    name = result["scenario"]
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=2, default=float))
    paths[1].write_text(markdown(result))
    for p in result["plots"]:
        paths.append(out / png_name(result, p))
        draw(p, paths[-1])
    return paths
