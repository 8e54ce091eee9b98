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


def test_each_lora_layer_costs_one_shrink_and_one_expand_launch_per_step(tiny_model, tiny_adapters, monkeypatch):
    """With the Triton path, a fused projection (q/k/v, gate/up) serves all its slices and every
    rank class of the batch (4, 8 and 16 here) in one shrink and one expand launch."""
    from loraplex.kernels import get_lora_ops
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine
    from loraplex.server.engine.sampler import SamplingParams
    from loraplex.server.engine.sequence import Request

    triton_ops = get_lora_ops("triton", "cpu")
    launches = {"shrink_kernel": 0, "expand_kernel": 0}
    for name in launches:
        kernel = getattr(triton_ops, name)

        class Counting:
            def __getitem__(self, grid, name=name, kernel=kernel):
                launches[name] += 1
                return kernel[grid]

        monkeypatch.setattr(triton_ops, name, Counting())
    engine = Engine(EngineConfig(model=str(tiny_model), kernels="triton", block_size=4, max_total_tokens=1024))
    for name in ("attn4", "mlp8", "all16"):
        engine.register_adapter(name, str(tiny_adapters[name]))
    forwards = []
    run = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda chunks: forwards.append(len(chunks)) or run(chunks))
    requests = [Request(prompt_token_ids=[5, 17, 42 + i], adapter=name, request_id=f"r{i}",
                        params=SamplingParams(max_new_tokens=4, ignore_eos=True))
                for i, name in enumerate(["attn4", "mlp8", "all16", None, "attn4"])]
    out = engine.generate(requests)
    assert all(len(o.token_ids) == 4 for o in out)
    lora_layers = 4 * len(engine.model.layers)  # qkv, o, gate_up, down in every layer
    assert forwards and all(n == len(requests) for n in forwards)  # all16 (every projection) in every step
    assert launches == {"shrink_kernel": lora_layers * len(forwards), "expand_kernel": lora_layers * len(forwards)}
