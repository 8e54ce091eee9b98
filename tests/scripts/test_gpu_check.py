"""scripts/gpu_check.sh, dry-run on this CPU, so the check waiting for the first lent GPU cannot
rot: --prepare writes what the GPU machine is carried (under its 64 MiB), and every step runs
end to end at tiny sizes (the kernels interpreted, the engine against PEFT in float32, the
adapters_per_batch scenario, the shrink/expand timing) and reports passed, or absent with why."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_a_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    assets, out = tmp_path / "assets", tmp_path / "out"
    prepared = subprocess.run(["scripts/gpu_check.sh", "--prepare", "--assets", str(assets)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert sum(f.stat().st_size for f in assets.rglob("*") if f.is_file()) < 64 * 2**20
    assert not list(assets.rglob("*.safetensors")), "the weights are rebuilt on the device, never carried"
    assert {w.name.split("-")[0] for w in (assets / "wheels").glob("*.whl")} == {"pytest", "pluggy", "iniconfig"}

    done = subprocess.run(["scripts/gpu_check.sh", "--dry-run", "--assets", str(assets), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    results = json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == 0, json.dumps(results, indent=1)[-6000:] + done.stderr[-2000:]
    assert {name: r["status"] for name, r in results.items()} == {
        "env": "passed", "kernels": "passed", "parity": "passed", "compiled": "absent",
        "adapters_per_batch": "passed", "bandwidth": "passed"}
    assert " passed" in results["kernels"]["summary"] and "failed" not in results["kernels"]["summary"]
    rows = results["parity"]["data"]["rows"]
    assert {r["adapter"] for r in rows} == {None, "attn4", "mlp8", "all16", "rs2"}
    assert all(r["engine_vs_peft32"] <= r["bound"] and r["token_flips"] == 0 for r in rows), rows
    assert all(r["adapter_effect"] > 10 * r["bound"] for r in rows if r["adapter"]), rows
    assert (out / "bench" / "adapters_per_batch.json").is_file()
    assert results["bandwidth"]["data"]["shrink"]["us"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "| parity | passed |" in table and "| compiled | absent |" in table
