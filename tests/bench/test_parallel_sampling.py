"""The parallel-sampling benchmark runs end to end on the tiny model, and its check holds."""
from __future__ import annotations

import json

from loraplex.bench import parallel_sampling


def test_parallel_sampling_reports_every_contender_and_equal_tokens(tiny_model, tmp_path):
    result = parallel_sampling.main(["--model", str(tiny_model), "--n", "3", "--prompt-tokens", "21",
                                     "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    assert result["same_tokens_shared_and_separate"] is True
    assert result["prompt_tokens"] == 21 and len(result["tokens_per_s"]) == 3
    assert all(rate > 0 for rate in result["tokens_per_s"].values())
    assert json.loads((tmp_path / "parallel_sampling.json").read_text())["n"] == 3
