"""The prefix-reuse benchmark runs end to end on the tiny model, and its check holds."""
from __future__ import annotations

from loraplex.bench import prefix_reuse


def test_prefix_reuse_reports_every_contender_and_equal_tokens(tiny_model, tmp_path):
    result = prefix_reuse.main(["--model", str(tiny_model), "--prefix-tokens", "24", "--waves", "2", "--per-wave", "2",
                                "--new-tokens", "3", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    assert result["same_tokens_with_and_without_cache"] is True
    assert result["prefix_tokens"] == 24 and len(result["tokens_per_s"]) == 3
    assert all(rate > 0 for rate in result["tokens_per_s"].values())
    assert (tmp_path / "prefix_reuse.json").is_file()
