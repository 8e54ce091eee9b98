"""Step by step, what loading adapters does to the running streams (in process, no gRPC).

`--streams` base-model sequences decode; after `--warmup` steps, `--loading` requests arrive,
each naming a registered rank-`--rank` adapter that is not yet resident. Prints every step's
wall time with the running and waiting counts and the adapters copied into slots so far, and
the longest step against the median: the engine-side part of scenario 3's stall figure
(which also carries gRPC and the client's own scheduling).

    python -m loraplex.bench.load_stall_steps --loading 16 --threads 2
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

from .workload import ATTENTION, prompts, write_loras


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--loading", type=int, default=1)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/out", help="directory for generated adapters")
    args = p.parse_args(argv)

    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine
    from loraplex.server.engine.loader import resolve_model
    from loraplex.server.engine.sampler import SamplingParams
    from loraplex.server.engine.sequence import Request

    model_dir = resolve_model(None)
    paths = write_loras(model_dir, Path(args.out) / "stall-adapters", args.loading, [args.rank], ATTENTION,
                        seed=9000)
    engine = Engine(EngineConfig(threads=args.threads, max_loras=args.loading + 1,
                                 max_running=args.streams + args.loading))
    for i, path in enumerate(paths):
        engine.register_adapter(f"s{i}", str(path))
    for text in prompts(args.streams):
        engine.add_request(Request(prompt=text, params=SamplingParams(max_new_tokens=args.steps + 20,
                                                                      ignore_eos=True)))
    gc.collect()  # as `loraplex serve` does after start-up: later collections skip start-up objects
    gc.freeze()
    rows = []
    for step in range(args.steps):
        if step == args.warmup:
            for j in range(args.loading):
                engine.add_request(Request(prompt="Say hello.", adapter=f"s{j}",
                                           params=SamplingParams(max_new_tokens=2, ignore_eos=True)))
        start = time.perf_counter()
        engine.step()
        rows.append({"step": step, "ms": (time.perf_counter() - start) * 1e3,
                     "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
                     "loads": engine.slots.loads})
    median = statistics.median(r["ms"] for r in rows[2:])
    for r in rows[args.warmup:]:
        print(f"step {r['step']:3d} {r['ms']:7.1f} ms  running {r['running']:2d}  waiting {r['waiting']:2d}  "
              f"loads {r['loads']}")
    longest = max(r["ms"] for r in rows[args.warmup:])
    print(f"median step {median:.1f} ms; longest after the arrivals {longest:.1f} ms ({longest / median:.2f}×)")
    return rows


if __name__ == "__main__":
    main()
