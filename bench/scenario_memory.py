"""Scenario 4: memory against resident adapters, and growth over register/serve/delete cycles.

Part one runs in a fresh child process per base (float32, NF4, int8), so resident memory is the
engine's alone: after pinning 0, 1, 2, 4, ... rank-16 adapters, the bytes held by live tensors
(every tensor the garbage collector tracks, each storage counted once) and VmRSS, beside what
the adapters' weights should add. Part two drives a real server through register (by server
path) / one request / delete cycles and fits the slope of its VmRSS after warm-up.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path

from .context import BenchContext
from .report import check, plot, table
from .server_process import python_env, start_server
from .workload import ATTENTION, write_loras


def live_tensor_bytes() -> int:
    """Bytes of every live tensor's storage (shared storages once), prepacked weights included."""
    import torch

    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            if obj.layout == torch._mkldnn:  # prepacked weights (quantize.py) have no storage to ask
                seen[-id(obj)] = obj.numel() * obj.element_size()
            else:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - objects half torn down by the collector
            continue
    return sum(seen.values())


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def probe(argv: list[str]) -> None:
    """Child process: print one JSON line per adapter count."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--quantize", default="none")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--counts", required=True)
    p.add_argument("adapters", nargs="+")
    args = p.parse_args(argv)
    from loraplex.server.engine.adapters import inspect_adapter
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    counts = [int(c) for c in args.counts.split(",")]
    engine = Engine(EngineConfig(model=args.model, quantize=args.quantize, max_loras=max(counts),
                                 max_cpu_loras=1, threads=args.threads))
    expected = 0
    pinned = 0
    for count in counts:
        while pinned < count:
            path = args.adapters[pinned]
            engine.register_adapter(f"a{pinned}", path)
            engine.slots.pin(f"a{pinned}")
            expected += inspect_adapter(path, engine.slots.base, engine.slots.max_rank)["nbytes"]
            pinned += 1
        print(json.dumps({"quantize": args.quantize, "adapters": count, "tensor_bytes": live_tensor_bytes(),
                          "rss": rss_bytes(), "adapter_bytes": expected}), flush=True)


def resident_curve(ctx: BenchContext, quantize: str, counts: list[int], adapters: list[Path]) -> list[dict]:
    cmd = [sys.executable, "-m", "loraplex.bench.scenario_memory", "--model", str(ctx.model_dir),
           "--quantize", quantize, "--threads", str(ctx.threads), "--counts", ",".join(map(str, counts)),
           *map(str, adapters[:max(counts)])]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=python_env())
    if done.returncode:
        raise RuntimeError(f"memory probe ({quantize}) failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def cycles(ctx: BenchContext, total: int, warmup: int, every: int) -> list[tuple[int, int]]:
    """(cycle, server VmRSS) every `every` register/serve/delete cycles."""
    from loraplex.clients.client import Client

    adapters = write_loras(ctx.model_dir, ctx.work / "cycle", 4, [8], ["q_proj", "v_proj"], seed=7000)
    points = []
    with start_server(ctx.model_dir, ctx.work / "store-cycles", ctx.out / "logs" / "memory-cycles.log",
                      "--max-loras", "2", "--max-cpu-loras", "2", *ctx.engine_flags(),
                      threads=ctx.threads, adapter_root=ctx.work) as server, \
            Client(server.target, timeout=120) as client:
        for stale in client.list_adapters():  # a previous run's leftovers
            client.delete_adapter(stale["name"])
        for i in range(total + 1):
            if i % every == 0:
                points.append((i, server.rss_bytes()))
            if i == total:
                break
            info = client.register_adapter("cycle", str(adapters[i % len(adapters)].resolve()))
            ref = f"cycle@{info['version']}"
            client.generate("Say hello.", adapter=ref, max_new_tokens=2, temperature=0.0)
            client.delete_adapter(ref)
    return points


def slope(points: list[tuple[int, int]], start: int) -> float:
    """Growth in bytes per cycle over the points at or after `start`: the median of the slopes
    between consecutive samples, so that one allocator trim (a drop of megabytes) does not hide
    a steady growth, as it does a least-squares fit."""
    pts = [(x, y) for x, y in points if x >= start]
    return statistics.median((y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in zip(pts, pts[1:]))


def run(ctx: BenchContext) -> dict:
    counts = ctx.size([0, 1, 4], [0, 1, 2, 4, 8, 16, 32])
    adapters = write_loras(ctx.model_dir, ctx.work / "adapters", max(counts), [16], ATTENTION, seed=0)
    curves = {}
    for quantize in ("none", "nf4", "int8"):
        ctx.log(f"memory: resident adapters, base {quantize}")
        curves[quantize] = resident_curve(ctx, quantize, counts, adapters)
    total, warmup, every = ctx.size((40, 10, 10), (1000, 200, 25))
    ctx.log(f"memory: {total} register/serve/delete cycles")
    rss = cycles(ctx, total, warmup, every)
    return result(curves, rss, counts, total, warmup)


def result(curves: dict[str, list[dict]], rss: list[tuple[int, int]], counts: list[int], total: int,
           warmup: int) -> dict:
    growth = slope(rss, warmup) / 1024
    rows, checks = [], []
    for quantize, curve in curves.items():
        zero = curve[0]
        for c in curve:
            grew = c["tensor_bytes"] - zero["tensor_bytes"]
            rows.append([quantize, c["adapters"], c["tensor_bytes"] / 2**20, c["rss"] / 2**20,
                         c["adapter_bytes"] / 2**20, grew / 2**20, grew / c["adapter_bytes"] if c["adapter_bytes"] else None])
        last = curve[-1]
        ratio = (last["tensor_bytes"] - zero["tensor_bytes"]) / last["adapter_bytes"]
        checks.append(check(f"live tensor growth ÷ adapters' bytes ({quantize}, {last['adapters']} adapters)", ratio,
                            "≈ 1 (≤ 2; on a CPU pools are made for every slot at first use, untouched until written)", 0.9 <= ratio <= 2.0))
    checks.append(check(f"server RSS growth per register/serve/delete cycle, cycles {warmup}-{total} (KB)", growth,
                        "≤ 1", growth <= 1.0))
    return {
        "scenario": "memory",
        "title": "4. Memory: resident adapters, quantized bases, register/serve/delete cycles",
        "config": {"counts": counts, "adapter": "rank 16 on q, k, v, o", "cycles": total, "warmup": warmup},
        "tables": [table("per base, after pinning N adapters (fresh process each)",
                         ["base", "adapters", "live tensors MiB", "RSS MiB", "adapters' weights MiB",
                          "tensor growth MiB", "growth ÷ weights"], rows),
                   table("server VmRSS over register/serve/delete cycles (every sample in the JSON and plot)",
                         ["cycle", "RSS MiB"], [[c, r / 2**20] for c, r in rss[::max(1, len(rss) // 10)]])],
        "plots": [plot("resident", "live tensor bytes against resident adapters", "resident adapters", "MiB",
                       {q: [[c["adapters"], c["tensor_bytes"] / 2**20] for c in curve] for q, curve in curves.items()}),
                  plot("cycles", "server RSS over register/serve/delete cycles", "cycle", "MiB",
                       {"VmRSS": [[c, r / 2**20] for c, r in rss]})],
        "checks": checks,
        "notes": ["The default model is stored as Q4_1 GGUF: its float weights are already 4-bit-rounded, "
                  "and NF4/int8 quantize a second time.",
                  "The probe keeps one host copy (--max-cpu-loras 1), so growth counts the device pools; "
                  "on a CPU a rank class's pools are made for every slot (--max-loras) when its first "
                  "adapter arrives, without touching them: live tensor bytes jump to the full pools at once "
                  "while resident memory grows only as adapters are written (no pool is ever copied to grow).",
                  "Growth per cycle is the median slope between consecutive RSS samples (robust to one "
                  f"allocator trim); between the first and last sample after warm-up RSS moved by "
                  f"{(rss[-1][1] - next(r for c, r in rss if c >= warmup)) / 1024:,.0f} KB."],
        "data": {"curves": curves, "rss": rss, "slope_kb_per_cycle": growth},
    }


if __name__ == "__main__":
    probe(sys.argv[1:])
