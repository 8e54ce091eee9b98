"""`loraplex generate --kernels triton` (Triton's interpreter on this CPU) and `--kernels torch`
give the same greedy tokens on a mixed batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

LINES = [
    {"prompt": "hello world", "adapter": "attn4"},
    {"prompt": "the quick brown fox", "adapter": "mlp8"},
    {"prompt": "SELECT name FROM", "adapter": "all16"},
    {"prompt": "translate to French", "adapter": "rs2", "soft_prompt": "soft"},
    {"prompt": "good morning"},
    {"prompt": "hello world, this is", "adapter": "all16"},
    {"messages": [{"role": "user", "content": "lazy dog"}], "adapter": "attn4"},
]


def test_triton_and_torch_paths_agree_on_a_mixed_batch(tmp_path, tiny_model, tiny_adapters):
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({**x, "max_new_tokens": 6, "ignore_eos": True})
                                                 for x in LINES))
    adapters = [a for name in ("attn4", "mlp8", "all16", "rs2") for a in ("--adapter", f"{name}={tiny_adapters[name]}")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command sets it up itself
    outputs = {}
    for kernels in ("torch", "triton"):
        proc = subprocess.run(
            [sys.executable, "-m", "loraplex.clients.cli", "generate", "--model", str(tiny_model), "--json",
             "--input", "in.jsonl", "--kernels", kernels, *adapters, "--soft-prompt", f"soft={tiny_adapters['soft']}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert f"kernels lora_{kernels}" in proc.stderr
        outputs[kernels] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(outputs["torch"]) == len(LINES)
    assert [o["token_ids"] for o in outputs["triton"]] == [o["token_ids"] for o in outputs["torch"]]
    assert all(len(o["token_ids"]) == 6 for o in outputs["torch"])
