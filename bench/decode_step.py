"""Where a decode step's time goes: the whole step against the matrix multiplies inside it.

Runs `--requests` sequences through the engine (request i on adapter i mod `--distinct`, or the
base model with 0), then times `--steps` decode steps, and separately the time spent inside the
base projections' matmuls during those steps, and the bare matmuls of the same shapes on their
own (F.linear and oneDNN-prepacked: the machine's ceiling).

    python -m loraplex.bench.decode_step --requests 32 --distinct 0 --threads 2
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .engine_throughput import CEILING_ONEDNN, CEILING_TORCH, ceiling_runs
from .workload import ATTENTION, make_adapters, prompts


@contextmanager
def timed_linears() -> Iterator[dict[str, float]]:
    """While inside, every base projection's forward adds its wall time to the yielded dict's
    'seconds' (DenseLinear.forward is wrapped, and restored on leaving)."""
    from loraplex.server.engine.quantize import DenseLinear

    spent = {"seconds": 0.0}
    original = DenseLinear.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        y = original(self, x)
        spent["seconds"] += time.perf_counter() - start
        return y

    DenseLinear.forward = forward
    try:
        yield spent
    finally:
        DenseLinear.forward = original


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--distinct", type=int, default=0, help="distinct rank-16 q,k,v,o adapters (0: base model)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--max-loras", type=int, help="adapter slots (default: --distinct)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cpu-matmul", default="auto", choices=["auto", "onednn", "torch"])
    p.add_argument("--out", default="bench/out", help="directory for generated adapters")
    args = p.parse_args(argv)

    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine
    from loraplex.server.engine.loader import resolve_model
    from loraplex.server.engine.sampler import SamplingParams
    from loraplex.server.engine.sequence import Request

    model_dir = resolve_model(None)
    engine = Engine(EngineConfig(threads=args.threads, max_loras=args.max_loras or max(1, args.distinct),
                                 max_running=args.requests, cpu_matmul=args.cpu_matmul, prefix_caching=False))
    names: list[str | None] = [None] * args.requests
    if args.distinct:
        paths = make_adapters(model_dir, Path(args.out) / "adapters", args.distinct, [16], ATTENTION)
        for i, path in enumerate(paths):
            engine.register_adapter(f"a{i}", str(path))
        names = [f"a{i % args.distinct}" for i in range(args.requests)]
    params = SamplingParams(max_new_tokens=args.steps + 4, ignore_eos=True)
    for text, name in zip(prompts(args.requests), names):
        engine.add_request(Request(prompt=text, adapter=name, params=params))
    engine.slots.read_ahead([n for n in names if n])
    for _ in range(3):  # the prefill, then two decode steps to warm up
        engine.step()
    with timed_linears() as spent:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step = (time.perf_counter() - start) / args.steps
    ceilings = {}
    for name, run in ceiling_runs(model_dir, args.requests, args.steps).items():
        run()
        start = time.perf_counter()
        run()
        ceilings[name] = (time.perf_counter() - start) / args.steps
    result = {"step_ms": step * 1e3, "matmuls_in_step_ms": spent["seconds"] / args.steps * 1e3,
              **{f"{k}_ms": v * 1e3 for k, v in ceilings.items()}}
    best = min(ceilings.values())
    print(f"decode step at batch {args.requests}, {args.distinct} distinct adapters, {args.threads} threads: "
          f"{result['step_ms']:.1f} ms; base matmuls inside it {result['matmuls_in_step_ms']:.1f} ms; "
          f"bare matmuls {ceilings[CEILING_TORCH] * 1e3:.1f} ms (F.linear)"
          + (f", {ceilings[CEILING_ONEDNN] * 1e3:.1f} ms (oneDNN)" if CEILING_ONEDNN in ceilings else "")
          + f"; step ÷ fastest bare matmuls {step / best:.2f}")
    return result


if __name__ == "__main__":
    main()
