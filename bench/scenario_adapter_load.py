"""Scenario 3: adapter load latency, and what loading does to the streams already running.

Part one, in process, for ranks 8, 16 and 64 on q, k, v, o: *validate* (config and safetensors
header, `inspect_adapter`), *read* (the tensors into host memory: `load_adapter` minus its own
validation) and *copy to slot* (host copy into the device pools: a slot load whose host copy is
cached). *Cold* drops the adapter's files from the page cache first (`posix_fadvise`
DONTNEED, this file only); *warm* reads them again straight away.

Part two, through a real server: a few long base-model streams run; N requests naming N
adapters not yet resident (rank 64) arrive while they do; the streams' longest gap between
tokens is compared with their median gap (one engine step).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from .context import BenchContext
from .load_generator import Spec, run as send
from .report import check, plot, table
from .server_process import ensure_registered, start_server
from .workload import ATTENTION, prompts, write_loras

RANKS = [8, 16, 64]


def drop_page_cache(directory: Path) -> None:
    for f in directory.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def phases(ctx: BenchContext, repeats: int) -> list[dict]:
    from loraplex.server.engine.adapters import inspect_adapter, load_adapter
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine

    engine = Engine(EngineConfig(model=str(ctx.model_dir), max_loras=1, max_cpu_loras=4, threads=ctx.threads,
                                 device=ctx.device, quantize=ctx.quantize))
    slots = engine.slots
    spare = write_loras(ctx.model_dir, ctx.work / "load" / "spare", 1, [4], ["q_proj"], seed=1)[0]
    engine.register_adapter("spare", str(spare))
    rows = []
    for rank in RANKS:
        paths = write_loras(ctx.model_dir, ctx.work / "load" / f"r{rank}", repeats, [rank], ATTENTION, seed=rank * 100)
        figures: dict[str, list[float]] = {}
        engine.register_adapter("pools", str(paths[0]))  # grows this rank's pools once, outside the timings
        slots.release(slots.acquire("pools"))
        engine.unregister_adapter("pools")
        for i, path in enumerate(paths):
            name = f"r{rank}-{i}"
            engine.register_adapter(name, str(path))
            for state in ("cold", "warm"):
                if state == "cold":
                    drop_page_cache(path)
                validate = timed(lambda: inspect_adapter(path, slots.base, slots.max_rank))
                if state == "cold":
                    drop_page_cache(path)
                load = timed(lambda: load_adapter(path, name, slots.base, slots.max_rank, slots.dtype))
                figures.setdefault(f"{state} validate", []).append(validate)
                figures.setdefault(f"{state} read", []).append(max(0.0, load - validate))
            drop_page_cache(path)
            figures.setdefault("slot load, all phases (cold)", []).append(
                timed(lambda: slots.release(slots.acquire(name))))
            slots.release(slots.acquire("spare"))  # evicts `name`; its host copy stays cached
            figures.setdefault("copy to slot", []).append(timed(lambda: slots.release(slots.acquire(name))))
            engine.unregister_adapter(name)
        size = sum(f.stat().st_size for f in paths[0].iterdir())
        rows.append({"rank": rank, "bytes": size, **{k: statistics.median(v) for k, v in figures.items()}})
    return rows


def stalls(ctx: BenchContext, counts: list[int], stream_tokens: int, streams: int) -> list[dict]:
    """Per N: the running streams' median and longest gap between tokens while N adapters load."""
    adapters = write_loras(ctx.model_dir, ctx.work / "load" / "stall-r64", sum(counts), [64], ATTENTION, seed=9000)
    log = ctx.out / "logs" / "adapter-load.log"
    out = []
    with start_server(ctx.model_dir, ctx.work / "store-load", log, "--max-loras", str(max(counts) + 1),
                      "--max-running", str(streams + max(counts)), *ctx.engine_flags(),
                      threads=ctx.threads, adapter_root=ctx.work) as server:
        ensure_registered(server.target, adapters, "s")
        used = 0
        for n in counts:
            texts = prompts(streams)
            specs = [Spec(0.0, t, stream_tokens) for t in texts]
            specs += [Spec(1.0 + 0.01 * j, "Say hello.", 2, f"s{used + j}") for j in range(n)]
            used += n
            records = send(server.target, specs)
            running = records[:streams]
            loaders = records[streams:]
            gaps = [g for r in running for g in r.gaps()[2:]]  # skip the first steps (other prefills)
            window = [g for r in running for a, g in zip(r.token_times[1:], r.gaps())
                      if loaders and min(x.sent for x in loaders) <= a <= max(x.done for x in loaders) + 0.5]
            out.append({"loading": n, "median_gap": statistics.median(gaps), "max_gap": max(gaps),
                        "max_gap_while_loading": max(window) if window else None,
                        "failed": sum(not r.ok for r in records)})
    return out


def run(ctx: BenchContext) -> dict:
    rows = phases(ctx, ctx.size(2, 5))
    stall = stalls(ctx, ctx.size([0, 2], [0, 1, 4, 16]), ctx.size(48, 160), ctx.size(2, 4))
    cols = ["rank", "file MB"] + [k for k in rows[0] if k not in ("rank", "bytes")]
    phase_rows = [[r["rank"], r["bytes"] / 1e6] + [r[k] * 1000 for k in cols[2:]] for r in rows]
    stall_rows = [[s["loading"], s["median_gap"] * 1000, s["max_gap"] * 1000,
                   (s["max_gap_while_loading"] or 0) * 1000, s["max_gap"] / s["median_gap"], s["failed"]] for s in stall]
    checks = [check(f"longest gap ÷ median gap while {s['loading']} adapters load", s["max_gap"] / s["median_gap"],
                    "≤ 2", s["max_gap"] / s["median_gap"] <= 2) for s in stall if s["loading"]]
    checks.append(check("failed requests", sum(s["failed"] for s in stall), "0", not any(s["failed"] for s in stall)))
    series = {k: [[r["rank"], r[k] * 1000] for r in rows] for k in cols[2:]}
    return {
        "scenario": "adapter_load",
        "title": "3. Adapter load: validate, read, copy to slot; stalls of running streams",
        "config": {"ranks": RANKS, "targets": ATTENTION},
        "tables": [table("milliseconds per adapter (median), float32, q/k/v/o", cols[:2] + [f"{c} ms" for c in cols[2:]],
                         phase_rows),
                   table("running streams while N rank-64 adapters load (through gRPC, client-side token times)",
                         ["adapters loading", "median gap ms", "longest gap ms", "longest gap in load window ms",
                          "longest ÷ median", "failed"], stall_rows)],
        "plots": [plot("phases", "adapter load phases against rank", "rank", "ms", series)],
        "checks": checks,
        "notes": ["Files are read on a background thread, in ~1 MB slices run between engine steps (at most "
                  "4 ms of them before each step) on a CPU; only the copy into a slot runs on the engine "
                  "thread, at most one adapter per step while others decode.",
                  "Gaps are measured by the client on the same cores, so they include its own scheduling jitter."],
        "data": {"phases": rows, "stalls": stall},
    }
