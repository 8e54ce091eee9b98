"""bench/hostile_prompts.py runs against a real server on the tiny model and reports every figure
(what the numbers are worth is docs/BENCHMARKS.md's business, not a test's)."""
from __future__ import annotations

import json

from loraplex.bench import hostile_prompts


def test_hostile_prompts_reports_refusals_and_latency(tiny_model, tmp_path):
    result = hostile_prompts.main(["--model", str(tiny_model), "--callers", "2", "--prompt-chars", "200000",
                                   "--pause", "0.05", "--samples", "2", "--new-tokens", "2", "--out", str(tmp_path)])
    assert result["refusal_codes"] == ["INVALID_ARGUMENT"] and result["refusals"] >= 100
    assert result["server_cpu_ms_per_refusal"] >= 0 and result["normal_beside_max_s"] > 0
    assert json.loads((tmp_path / "hostile_prompts.json").read_text()) == result
