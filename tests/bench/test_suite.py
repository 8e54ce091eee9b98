"""`loraplex bench`: the whole suite at --quick sizes writes sane results; bad arguments are refused."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.bench.server_metrics import bucket_quantile

SCENARIOS = ["adapters_per_batch", "many_adapters", "adapter_load", "memory", "latency"]
PNG = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`loraplex bench ARGS` started in `cwd` (a test's own directory: `python -m` puts its working
    directory on sys.path, and the repository root must not shadow installed packages)."""
    return subprocess.run([sys.executable, "-m", "loraplex.clients.cli", "bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_scenario_and_bad_threads_are_refused(tmp_path):
    done = bench("adapters_per_batch", "nope", "--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown scenario 'nope'" in done.stderr and "many_adapters" in done.stderr
    done = bench("--threads", "0", "--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "--threads must be at least 1" in done.stderr
    assert not any(tmp_path.iterdir())


def test_bucket_quantile_interpolates_like_prometheus():
    cumulative = [(0.1, 0.0), (0.2, 10.0), (0.4, 20.0), (math.inf, 20.0)]
    assert bucket_quantile(cumulative, 0.5) == pytest.approx(0.2)
    assert bucket_quantile(cumulative, 0.25) == pytest.approx(0.15)
    assert bucket_quantile(cumulative, 0.99) == pytest.approx(0.2 + 0.2 * 0.98)
    assert bucket_quantile([(0.1, 0.0), (math.inf, 3.0)], 0.5) == 0.1  # only +Inf: the largest finite bound
    assert math.isnan(bucket_quantile([(0.1, 0.0), (math.inf, 0.0)], 0.5))


@pytest.mark.slow
def test_quick_suite_writes_sane_results(tmp_path):
    out = tmp_path / "suite"
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("# head\n<!-- bench-suite:start -->\nold\n<!-- bench-suite:end -->\ntail\n")
    done = bench("--quick", "--threads", "1", "--out", str(out), "--work", str(tmp_path / "work"), "--docs", str(docs),
                 cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {}
    for name in SCENARIOS:
        results[name] = json.loads((out / f"{name}.json").read_text())
        assert (out / f"{name}.md").read_text().startswith("### ")
        for p in results[name]["plots"]:
            png = (out / f"{name}-{p['name']}.png").read_bytes()
            assert png.startswith(PNG) and len(png) > 5000
        assert results[name]["machine"]["threads"] >= 1
    summary = (out / "SUMMARY.md").read_text()
    assert all(r["title"] in summary for r in results.values())
    text = docs.read_text()
    assert text.startswith("# head\n") and text.endswith("tail\n") and "\nold\n" not in text
    assert all(r["title"] in text for r in results.values())
    assert all((tmp_path / "bench" / png.name).is_file() and f"(bench/{png.name})" in text for png in out.glob("*.png"))

    # 1: every contender produced tokens; the implementations agree; the ratios are there
    per_batch = results["adapters_per_batch"]
    for point, rates in per_batch["data"]["rates"].items():
        assert all(r > 0 for runs in rates.values() for r in runs), point
    agreement = [c for c in per_batch["checks"] if c["name"].startswith("greedy agreement")]
    assert len(agreement) >= 5 and all(c["passed"] for c in agreement)
    assert all(v > 0 for ratios in per_batch["data"]["ratios"].values() for v in ratios.values() if v is not None)
    assert any("/ PEFT mixed batch" in c["name"] and c["value"] > 0 for c in per_batch["checks"])

    # 2: no request lost; slots fewer than adapters cost hits
    many = results["many_adapters"]["data"]["runs"]
    assert all(r["completed"] == r["requests"] and r["tokens_per_s"] > 0 for r in many)
    for r in many:
        assert 0 <= r["hit_rate"] <= 1 and r["ttft_p50"] > 0 and r["ttft_p99"] >= r["ttft_p50"]
    few = [r for r in many if r["slots"] < r["adapters"]]
    assert few and all(r["loads"] >= 1 for r in few)

    # 3: each phase measured, bigger ranks read more bytes
    phases = results["adapter_load"]["data"]["phases"]
    assert [p["rank"] for p in phases] == [8, 16, 64]
    assert phases[0]["bytes"] < phases[1]["bytes"] < phases[2]["bytes"]
    assert all(p[k] > 0 for p in phases for k in ("cold read", "warm validate", "copy to slot"))
    assert all(s["failed"] == 0 and s["median_gap"] > 0 for s in results["adapter_load"]["data"]["stalls"])

    # 4: resident adapters add at least their own bytes, on every base; cycles measured the server
    memory = results["memory"]["data"]
    assert set(memory["curves"]) == {"none", "nf4", "int8"}
    for curve in memory["curves"].values():
        assert curve[-1]["tensor_bytes"] - curve[0]["tensor_bytes"] >= curve[-1]["adapter_bytes"] > 0
    assert memory["curves"]["nf4"][0]["tensor_bytes"] < memory["curves"]["none"][0]["tensor_bytes"]
    assert len(memory["rss"]) >= 3 and all(rss > 0 for _, rss in memory["rss"])

    # 5: latency rises with load; past saturation only RESOURCE_EXHAUSTED, answered at once
    latency = results["latency"]
    runs = latency["data"]["runs"]
    assert all(r["achieved_rate"] > 0 for r in runs)
    assert all(c["passed"] is not False for c in latency["checks"]), latency["checks"]


@pytest.mark.slow
def test_scenario_one_runs_every_contender_on_an_nf4_base(tmp_path):
    """`--quantize nf4` (what a GPU run pairs with `--device cuda`): loraplex, HF and PEFT all on
    the NF4 base, agreeing token for token; the machine record says so."""
    out = tmp_path / "nf4"
    done = bench("adapters_per_batch", "--quick", "--quantize", "nf4", "--device", "cpu", "--threads", "1",
                 "--out", str(out), "--work", str(tmp_path / "work"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "adapters_per_batch.json").read_text())
    assert "nf4 base" in result["title"]
    assert result["machine"]["quantize"] == "nf4" and result["machine"]["device"] == "cpu"
    agreement = [c for c in result["checks"] if c["name"].startswith("greedy agreement")]
    assert len(agreement) >= 5 and all(c["passed"] for c in agreement)
    assert "nf4 base (float32 compute), on cpu" in (out / "SUMMARY.md").read_text()
