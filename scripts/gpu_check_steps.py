"""The steps of scripts/gpu_check.py, one per call: `gpu_check_steps.py STEP --out DIR [--dry-run]`.

Each writes DIR/STEP.json: {"status": passed | failed | absent, "summary": one line, "data": ...}
and exits 1 when it failed. On a dry run (a CPU) the same code runs at tiny sizes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = Path(os.environ.get("GPU_CHECK_ASSETS") or REPO / ".gpu_check") / "smollm2"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # a dry run's SmolLM2: its tokenizer, 2 small layers
FP16_FACTOR = 2.0  # the engine in float16 may be this much further from float32 than PEFT in float16 is
PROMPTS = [[5, 17, 42, 99, 7], [11, 3, 250, 64, 33, 8, 91], [200, 12], [7, 7, 19, 140, 66, 5, 81, 9, 10, 44]]
CASES = [(None, None), ("attn4", None), ("mlp8", None), ("all16", None), ("rs2", None), (None, "soft"),
         ("all16", None), ("attn4", None)]  # (adapter, soft prompt) per request, one mixed batch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "absent"


def env(dry_run: bool, out: Path) -> dict:
    data = {name: _version(name) for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "pytest")}
    data["python"] = sys.version.split()[0]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        data.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        data["device"] = "cpu (no CUDA device)"
    ok = dry_run or torch.cuda.is_available()
    return {"status": "passed" if ok else "failed", "summary": data["device"], "data": data}


def kernels(dry_run: bool, out: Path) -> dict:
    """The Triton kernel tests, compiled on the GPU (interpreted on a dry run, one test)."""
    select = ["-k", "rank_classes_served_in_one_step and float32"] if dry_run else []
    done = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels",
                           *select], cwd=REPO, capture_output=True, text=True)
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return {"status": "passed" if done.returncode == 0 else "failed", "summary": last,
            "data": {"tail": done.stdout[-4000:] + done.stderr[-2000:]}}


def _conftest(path: str):
    """A tests/ conftest as a module (its builders are plain functions)."""
    spec = importlib.util.spec_from_file_location(f"gpu_check_{Path(path).parent.name}_conftest", REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_model(dry_run: bool, work: Path) -> Path:
    """SmolLM2's config (shrunk on a dry run) with random float32 weights, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = work / "model"
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    config = AutoConfig.from_pretrained(SMOLLM2)
    for key, value in (TINY if dry_run else {}).items():
        setattr(config, key, value)
    config.initializer_range = 0.1  # wide enough that greedy margins are not all near-ties
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (SMOLLM2 / name).is_file():
            shutil.copyfile(SMOLLM2 / name, model_dir / name)
    return model_dir


def build_adapters(model_dir: Path, work: Path) -> dict[str, Path]:
    """The adapters the CPU suite checks SmolLM2's parity with (tests/conftest.py)."""
    return _conftest("tests/conftest.py").build_parity_adapters(model_dir, work / "adapters")


@torch.no_grad()
def _peft_logits(model_dir: Path, adapter: Path | None, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """PEFT's teacher-forced logits [len(ids), vocab] on the device, as float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device())
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).to(device())
    logits = model(input_ids=torch.tensor([ids], device=device())).logits[0]
    return logits[-len(ids):].float().cpu()


def _flips(ref: torch.Tensor, prompt_len: int, tokens: list[int], atol: float) -> int:
    """Generated tokens that PEFT's float32 logits (teacher-forced on them) would not pick, where
    its top-1/top-2 margin is no near-tie (DESIGN.md's rule)."""
    flips = 0
    for j, token in enumerate(tokens):
        row = ref[prompt_len - 1 + j]
        top = torch.topk(row, 2)
        if int(top.indices[0]) != token and float(top.values[0] - top.values[1]) >= 2 * atol:
            flips += 1
    return flips


def parity(dry_run: bool, out: Path) -> dict:
    """The engine in float16 on the device, one mixed batch, against PEFT in float32 and float16."""
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine
    from loraplex.server.engine.sampler import SamplingParams
    from loraplex.server.engine.sequence import Request

    work = out / "work"
    model_dir = build_model(dry_run, work)
    adapters = build_adapters(model_dir, work)
    dtype = "float32" if device().type == "cpu" else "float16"  # the CPU dry run checks the path, not float16
    engine = Engine(EngineConfig(model=str(model_dir), device=device().type, dtype=dtype, max_total_tokens=4096,
                                 block_size=16))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    steps = 4 if dry_run else 8
    requests = [Request(prompt_token_ids=PROMPTS[i % len(PROMPTS)], adapter=a, soft_prompt=s, request_id=f"r{i}",
                        params=SamplingParams(max_new_tokens=steps, ignore_eos=True))
                for i, (a, s) in enumerate(CASES)]
    results = engine.generate(requests)
    errors = [r.error for r in results if r.error is not None]
    if errors:
        return {"status": "failed", "summary": f"generate failed: {errors[:2]}", "data": {}}
    forced = [Request(prompt_token_ids=q.prompt_token_ids + list(r.token_ids), adapter=q.adapter,
                      soft_prompt=q.soft_prompt) for q, r in zip(requests, results)]
    got = engine.prompt_logits(forced)
    base = engine.prompt_logits([Request(prompt_token_ids=r.prompt_token_ids) for r in forced])
    rows, worst = [], 0.0
    for req, logits, plain in zip(forced, got, base):
        if req.soft_prompt is not None:
            continue  # PEFT's prompt tuning is checked against the engine in the CPU suite
        ids = req.prompt_token_ids
        ref32 = _peft_logits(model_dir, adapters.get(req.adapter), ids, torch.float32)
        ref16 = _peft_logits(model_dir, adapters.get(req.adapter), ids, getattr(torch, dtype))
        ours, theirs = (logits.float().cpu() - ref32).abs().max().item(), (ref16 - ref32).abs().max().item()
        bound = max(FP16_FACTOR * theirs, 1e-4)
        rows.append({"adapter": req.adapter, "engine_vs_peft32": ours, "peft16_vs_peft32": theirs, "bound": bound,
                     "token_flips": _flips(ref32, len(ids) - steps, ids[-steps:], bound),
                     "adapter_effect": (logits.float() - plain.float()).abs().max().item()})
        worst = max(worst, ours / bound)
    ok = worst <= 1.0 and not any(r["token_flips"] for r in rows) and all(  # a wrong adapter would show
        r["adapter_effect"] > 10 * r["bound"] for r in rows if r["adapter"])
    return {"status": "passed" if ok else "failed", "data": {"dtype": dtype, "rows": rows},
            "summary": f"{dtype} mixed batch of {len(CASES)}: worst |engine - PEFT fp32| at {worst:.2f} of its bound "
                       f"({FP16_FACTOR}x PEFT's own {dtype} error)"}


def compiled(dry_run: bool, out: Path) -> dict:
    return {"status": "absent", "summary": "no compiled decode step yet (`--compile`, issue 24)", "data": {}}


def adapters_per_batch(dry_run: bool, out: Path) -> dict:
    """The benchmark scenario on the device, at quick sizes (its JSON goes to OUT/bench)."""
    from loraplex.bench.context import BenchContext
    from loraplex.bench.scenario_adapters_per_batch import run

    model_dir = build_model(dry_run, out / "work")
    ctx = BenchContext(model_dir=model_dir, out=out / "bench", work=out / "work" / "bench", quick=True, threads=1,
                       device=device().type)
    ctx.out.mkdir(parents=True, exist_ok=True)
    result = run(ctx)
    (ctx.out / "adapters_per_batch.json").write_text(json.dumps(result, indent=1, default=str))
    return {"status": "passed", "summary": "quick sizes; `loraplex bench --report-only --out OUT/bench` renders it",
            "data": {"keys": sorted(result)}}


def _time(fn, repeats: int) -> float:
    fn()
    if device().type == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device().type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - begin) / repeats


def bandwidth(dry_run: bool, out: Path) -> dict:
    """lora_shrink / lora_expand at a decode step's shape against the device's copy bandwidth."""
    from loraplex.kernels import lora_triton
    from loraplex.kernels.lora_groups import TokenGroups

    dev, dt = device(), (torch.float32 if device().type == "cpu" else torch.float16)
    tokens, slots, rank, width = (8, 4, 16, 64) if dry_run else (256, 32, 16, 1536)
    repeats = 2 if dry_run else 200
    x = torch.randn(tokens, width, device=dev, dtype=dt)
    a_pool = torch.randn(slots, rank, width, device=dev, dtype=dt)
    b_pool = torch.randn(slots, width, rank, device=dev, dtype=dt)
    y = torch.zeros(tokens, width, device=dev, dtype=dt)
    per = tokens // slots
    groups = TokenGroups.build([i * per for i in range(slots)], [per] * slots, list(range(slots)), dev)
    xa = lora_triton.lora_shrink(x, a_pool, groups)
    shrink_s = _time(lambda: lora_triton.lora_shrink(x, a_pool, groups), repeats)
    expand_s = _time(lambda: lora_triton.lora_expand(xa, b_pool, groups, y), repeats)
    big = torch.empty(64 * 2**20 if not dry_run else 2**20, dtype=torch.uint8, device=dev)
    copy_s = _time(lambda: big.clone(), repeats)
    peak = 2 * big.numel() / copy_s  # bytes read + written per second
    item = x.element_size()
    moved = {"shrink": (x.numel() + a_pool.numel() + xa.numel()) * item,
             "expand": (xa.numel() + b_pool.numel() + 2 * y.numel()) * item}
    data = {"shape": dict(tokens=tokens, slots=slots, rank=rank, width=width, dtype=str(dt)),
            "copy_gbps": peak / 1e9}
    for op, seconds in (("shrink", shrink_s), ("expand", expand_s)):
        data[op] = {"us": seconds * 1e6, "gbps": moved[op] / seconds / 1e9, "of_copy_bound": moved[op] / seconds / peak}
    return {"status": "passed", "data": data,
            "summary": f"shrink {data['shrink']['of_copy_bound']:.2f}, expand {data['expand']['of_copy_bound']:.2f} "
                       f"of the copy bandwidth ({peak / 1e9:.0f} GB/s)"}


STEPS = {f.__name__: f for f in (env, kernels, parity, compiled, adapters_per_batch, bandwidth)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    try:
        result: dict[str, Any] = STEPS[args.step](args.dry_run, out)
    except Exception as exc:  # a step's failure is its result; the other steps still run
        result = {"status": "failed", "summary": f"{type(exc).__name__}: {str(exc)[:300]}", "data": {}}
    (out / f"{args.step}.json").write_text(json.dumps(result, indent=1, default=str))
    return 1 if result["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
