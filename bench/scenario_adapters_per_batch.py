"""Scenario 1: decode throughput against the number of distinct adapters in one batch.

In one process, float32 (or the suite's `--quantize` base for every contender) on the suite's
`--device`, the same thread count and prompts, every request generating exactly
`new_tokens` tokens (EOS ignored): loraplex with k distinct adapters (request i uses adapter
i mod k; k = 0 is the base model), HF `generate` base-only, PEFT's mixed batch
(`generate(adapter_names=...)`) and PEFT switching adapters between sub-batches (`set_adapter`
per adapter, one `generate` per sub-batch), beside the bare matrix multiplies of the same decode
steps (the machine's ceiling). Every point runs its contenders back to back in each round, so
the per-round ratios cancel the machine's drift.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from .context import BenchContext
from .engine_throughput import (CEILING_ONEDNN, CEILING_TORCH, agreement, ceiling_rates, ceiling_runs, hf_model, hf_run,
                                paired_ratio)
from .report import check, plot, table
from .workload import ATTENTION, Timer, prompts, write_loras

Run = Callable[[], list[list[int]]]
AGREE = 0.9  # greedy agreement expected between implementations (near-ties may flip the rest)


def points(ctx: BenchContext) -> list[tuple[str, int, int]]:
    """(adapter set, distinct adapters, concurrent requests) to measure."""
    if ctx.quick:
        return [("r16", 0, 4), ("r16", 4, 4), ("mixed", 4, 4)]
    sweep = [("r16", k, 32) for k in (0, 1, 2, 4, 8, 16, 32)] + [("r16", 64, 64)]
    return sweep + [("mixed", 32, 32)]


def adapter_sets(ctx: BenchContext, count: int) -> dict[str, list[Path]]:
    """Rank 16 on q, k, v, o; and ranks 4-64 (cycling 4, 8, 16, 32, 64) on the same modules."""
    root = ctx.work / "adapters"
    return {"r16": write_loras(ctx.model_dir, root, count, [16], ATTENTION, seed=0),
            "mixed": write_loras(ctx.model_dir, root, count, [4, 8, 16, 32, 64], ATTENTION, seed=1000)}


def names_for(adapter_set: str, k: int, n: int) -> list[str | None]:
    return [f"{adapter_set}-{i % k}" if k else None for i in range(n)]


def loraplex_engine(ctx: BenchContext, sets: dict[str, list[Path]], max_running: int):
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    slots = sum(len(v) for v in sets.values())
    # no prefix cache: the rounds replay the same prompts, and the peers compute them every time
    engine = Engine(EngineConfig(model=str(ctx.model_dir), max_loras=slots, max_running=max_running,
                                 threads=ctx.threads, prefix_caching=False, device=ctx.device, quantize=ctx.quantize))
    for set_name, paths in sets.items():
        for i, path in enumerate(paths):
            engine.register_adapter(f"{set_name}-{i}", str(path))
    return engine


def loraplex_run(engine, texts: list[str], names: list[str | None], new_tokens: int) -> Run:
    from loraplex.server.engine.sampler import SamplingParams
    from loraplex.server.engine.sequence import Request

    def run(tokens: int = new_tokens) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        results = engine.generate([Request(prompt=t, params=params, adapter=a) for t, a in zip(texts, names)])
        bad = [r.error for r in results if r.error is not None or len(r.token_ids) != tokens]
        if bad:
            raise RuntimeError(f"loraplex run failed: {bad[:3]}")
        return [r.token_ids for r in results]

    run(2)  # loads the adapters into their slots
    return run


def peft_model(ctx: BenchContext, sets: dict[str, list[Path]]):
    from peft import PeftModel

    base = hf_model(ctx.model_dir, ctx.device, ctx.quantize)
    model = None
    for set_name, paths in sets.items():
        for i, path in enumerate(paths):
            if model is None:
                model = PeftModel.from_pretrained(base, path, adapter_name=f"{set_name}-{i}")
            else:
                model.load_adapter(path, adapter_name=f"{set_name}-{i}")
    return model.eval()


def peft_switch_run(model, tokenizer, texts: list[str], names: list[str], new_tokens: int) -> Run:
    """One `set_adapter` + `generate` per distinct adapter, on that adapter's requests."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    runs = {name: hf_run(model, tokenizer, [texts[i] for i in idx], new_tokens) for name, idx in groups.items()}

    def run() -> list[list[int]]:
        out: list[list[int]] = [[] for _ in texts]
        for name, idx in groups.items():
            model.set_adapter(name)
            for i, ids in zip(idx, runs[name]()):
                out[i] = ids
        return out

    return run


def run(ctx: BenchContext) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(ctx.threads)
    new_tokens = ctx.size(8, 64)  # the issue measured its peers at 32 requests x 64 new tokens
    repeats = 1  # the whole sweep once; engine_throughput.py times one point in interleaved rounds
    pts = points(ctx)
    max_k = max(k for _, k, _ in pts)
    max_n = max(n for _, _, n in pts)
    switch_limit = ctx.size(4, 16)  # PEFT switching at 64 sub-batches of one takes minutes per round
    sets = adapter_sets(ctx, max_k)
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    eos = {tokenizer.eos_token_id}
    ctx.log(f"adapters per batch: loading loraplex, HF and PEFT with {2 * max_k} adapters")
    engine = loraplex_engine(ctx, sets, max_n)
    hf = hf_model(ctx.model_dir, ctx.device, ctx.quantize)
    peft = peft_model(ctx, sets)

    contenders: dict[tuple, dict[str, Run]] = {}
    for n in sorted({n for _, _, n in pts}):  # the base-model contenders, once per batch size
        texts = prompts(n)
        contenders[("base", 0, n)] = {"loraplex base": loraplex_run(engine, texts, [None] * n, new_tokens),
                                      "HF generate base": hf_run(hf, tokenizer, texts, new_tokens),
                                      **ceiling_runs(ctx.model_dir, n, new_tokens, ctx.device)}
    for set_name, k, n in pts:
        texts = prompts(n)
        names = names_for(set_name, k, n)
        c = {"loraplex": loraplex_run(engine, texts, names, new_tokens)}
        if k:
            c["PEFT mixed batch"] = hf_run(peft, tokenizer, texts, new_tokens, adapter_names=names)
            if k <= switch_limit:
                c["PEFT switching"] = peft_switch_run(peft, tokenizer, texts, names, new_tokens)
        contenders[(set_name, k, n)] = c

    rates = {p: {name: [] for name in c} for p, c in contenders.items()}
    outputs: dict[tuple, dict[str, list[list[int]]]] = {p: {} for p in contenders}
    for r in range(repeats):
        for p, c in contenders.items():
            ctx.log(f"adapters per batch: round {r + 1}/{repeats}, {p[0]} k={p[1]} n={p[2]}")
            for name, fn in c.items():
                with Timer() as t:
                    outputs[p][name] = fn()
                rates[p][name].append(p[2] * new_tokens / t.seconds)
    for p in rates:
        if p[0] == "base":
            rates[p]["matmul ceiling"] = ceiling_rates(rates[p])
    return result(ctx, pts, rates, outputs, eos, new_tokens, repeats, switch_limit)


def result(ctx, pts, rates, outputs, eos, new_tokens, repeats, switch_limit) -> dict:
    rows, checks, ratios = [], [], {}
    names = ["loraplex", "loraplex base", "HF generate base", "PEFT mixed batch", "PEFT switching",
             CEILING_TORCH, CEILING_ONEDNN]
    for p in pts:
        set_name, k, n = p
        r = {**rates[p], **rates[("base", 0, n)]}
        med = {name: statistics.median(v) if name in r else None for name, v in ((x, r.get(x, [])) for x in names)}
        pr = {
            "loraplex / own base": paired_ratio(r["loraplex"], r["loraplex base"]),
            "loraplex base / HF base": paired_ratio(r["loraplex base"], r["HF generate base"]),
            "loraplex base time / matmul time": paired_ratio(r["matmul ceiling"], r["loraplex base"]),
            "F.linear time / oneDNN time": (paired_ratio(r[CEILING_ONEDNN], r[CEILING_TORCH])
                                            if CEILING_ONEDNN in r else None),
            "loraplex / PEFT mixed": paired_ratio(r["loraplex"], r["PEFT mixed batch"]) if k else None,
            "loraplex / PEFT switching": paired_ratio(r["loraplex"], r["PEFT switching"]) if "PEFT switching" in r else None,
        }
        ratios[f"{set_name} k={k} n={n}"] = pr
        rows.append([set_name, k, n] + [med[x] for x in names] + [pr["loraplex / own base"], pr["loraplex / PEFT mixed"]])
        o = {**outputs[p], **outputs[("base", 0, n)]}
        agree = {"loraplex base = HF base": agreement(o["loraplex base"], o["HF generate base"], eos)}
        if k:
            agree["loraplex = PEFT mixed"] = agreement(o["loraplex"], o["PEFT mixed batch"], eos)
        if "PEFT switching" in o:
            agree["loraplex = PEFT switching"] = agreement(o["loraplex"], o["PEFT switching"], eos)
        for what, value in agree.items():
            checks.append(check(f"greedy agreement, {what} ({set_name} k={k} n={n})", value, f"≥ {AGREE}", value >= AGREE))
    key = ("r16", 32, 32) if ("r16", 32, 32) in pts else max((p for p in pts if p[0] == "r16"), key=lambda p: p[1])
    kr = ratios[f"{key[0]} k={key[1]} n={key[2]}"]
    checks += [
        check(f"loraplex base / HF generate base (n={key[2]})", kr["loraplex base / HF base"], "≥ 1.5",
              kr["loraplex base / HF base"] >= 1.5),
        check(f"loraplex run time / bare matmul time (base, n={key[2]})", kr["loraplex base time / matmul time"],
              "≤ 1.3", kr["loraplex base time / matmul time"] <= 1.3),
        check(f"loraplex {key[1]} adapters / own base", kr["loraplex / own base"], "≥ 0.85",
              kr["loraplex / own base"] >= 0.85),
        check(f"loraplex {key[1]} adapters / PEFT mixed batch", kr["loraplex / PEFT mixed"], "≥ 3",
              kr["loraplex / PEFT mixed"] >= 3),
    ]
    series = {}
    for name in ("loraplex", "PEFT mixed batch", "PEFT switching"):
        series[name] = [[p[1], statistics.median(rates[p][name])] for p in pts
                        if p[0] == "r16" and p[1] and name in rates[p]]
    for name in ("loraplex base", "HF generate base", CEILING_TORCH, CEILING_ONEDNN):
        series[name] = [[p[1], statistics.median(rates[("base", 0, p[2])][name])] for p in pts
                        if p[0] == "r16" and name in rates[("base", 0, p[2])]]
    series["loraplex, ranks 4-64"] = [[p[1], statistics.median(rates[p]["loraplex"])] for p in pts if p[0] == "mixed"]
    return {
        "scenario": "adapters_per_batch",
        "title": f"1. Distinct adapters per batch (tokens/s, {_base(ctx)}, in one process)",
        "config": {"new_tokens": new_tokens, "repeats": repeats, "points": pts, "targets": ATTENTION,
                   "sets": {"r16": "rank 16", "mixed": "ranks 4, 8, 16, 32, 64 cycling"}},
        "tables": [table("tokens/s (median of rounds) and paired ratios",
                         ["set", "adapters", "requests"] + names + ["/ own base", "/ PEFT mixed"], rows)],
        "plots": [plot("throughput", "tokens/s against distinct adapters per batch (rank 16 unless noted)",
                       "distinct adapters in the batch", "tokens/s", series, logx=True)],
        "checks": checks,
        "notes": [f"{new_tokens} new tokens per request (EOS ignored), one round: the base-model contenders "
                  "(loraplex base, HF generate, matmul ceiling) run once per batch size and every point is "
                  "divided by them; engine_throughput.py times one point in interleaved rounds.",
                  "The run time includes the prefill, so 'run time / bare matmul time' overstates the decode "
                  "step's overhead a little. The bare matmul time is the faster of F.linear and oneDNN's "
                  "prepacked weights (the engine's CPU default, `--cpu-matmul`) in the same round.",
                  "The 64-request points use 64 distinct adapters; PEFT switching is measured up to "
                  f"{switch_limit} sub-batches (one generate per adapter): beyond that one round takes minutes."],
        "data": {"rates": {f"{p[0]} k={p[1]} n={p[2]}": rates[p] for p in rates}, "ratios": ratios},
    }


def _base(ctx: BenchContext) -> str:
    return "float32" if ctx.quantize == "none" else f"{ctx.quantize} base"

