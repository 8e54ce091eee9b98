"""`loraplex bench [SCENARIO...] [--out DIR] [--quick]`: the benchmark suite.

Every scenario runs loraplex and, where they exist, its peers in the same run, on the same
prompts and lengths, with the same dtype (float32) and thread count, and writes
`<scenario>.json`, `<scenario>.md` and PNG plots into --out; `SUMMARY.md` gathers them with the
machine, the command and the date. `--docs FILE` also replaces the part of FILE between
`<!-- bench-suite:start -->` and `<!-- bench-suite:end -->` with that summary, its plots copied into
FILE's folder under bench/.

--quick: the default model (SmolLM2-135M-Instruct) at tiny sizes (a few requests, a few
tokens, tens of adapters), a few minutes on 2 CPU cores; it checks that the suite works, not
how fast anything is.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

SCENARIOS = {
    "adapters_per_batch": "loraplex.bench.scenario_adapters_per_batch",
    "many_adapters": "loraplex.bench.scenario_many_adapters",
    "adapter_load": "loraplex.bench.scenario_adapter_load",
    "memory": "loraplex.bench.scenario_memory",
    "latency": "loraplex.bench.scenario_latency",
}
START, END = "<!-- bench-suite:start -->", "<!-- bench-suite:end -->"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help=f"any of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--out", default="bench/out/suite", help="directory for results (default: %(default)s)")
    p.add_argument("--work", help="directory for generated adapters and stores, reused across runs "
                                  "(default: OUT/../work)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs (CI)")
    p.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads for every contender (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="where loraplex and its peers run: auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--quantize", choices=["none", "nf4", "fp4", "int8"], default="none",
                   help="the base model's weights for loraplex and its peers (bitsandbytes; default: float32)")
    p.add_argument("--docs", help="also write the summary into this markdown file between its markers")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild SUMMARY.md (and --docs) from the JSON results already in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        print(f"loraplex bench: unknown scenario {', '.join(map(repr, unknown))}; choose from "
              f"{', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("loraplex bench: --threads must be at least 1", file=sys.stderr)
        return 2
    docs = Path(args.docs) if args.docs else None
    if docs and not (docs.is_file() and START in docs.read_text() and END in docs.read_text()):
        print(f"loraplex bench: --docs {docs} must be a file containing {START} and {END}", file=sys.stderr)
        return 2

    from loraplex.server.engine.loader import resolve_model

    from .context import BenchContext
    from .report import write
    from .summary import summary, update_docs

    out = Path(args.out)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = BenchContext(model_dir=resolve_model(args.model), out=out,
                       work=Path(args.work) if args.work else out.parent / "work", quick=args.quick,
                       threads=args.threads, device=device, quantize=args.quantize)
    command = "loraplex bench " + shlex.join(argv)
    results = []
    if args.report_only:
        results = [json.loads((out / f"{name}.json").read_text()) for name in args.scenarios or list(SCENARIOS)
                   if (out / f"{name}.json").is_file()]
        for result in results:  # markdown and plots again, from the JSON
            write(result, out)
    for name in [] if args.report_only else args.scenarios or list(SCENARIOS):
        begin = time.perf_counter()
        ctx.log(f"scenario {name}")
        result = importlib.import_module(SCENARIOS[name]).run(ctx)
        result["seconds"] = time.perf_counter() - begin
        result["command"] = command
        result["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
        result["machine"] = machine_info(ctx)
        write(result, out)
        results.append(result)
        ctx.log(f"scenario {name}: {result['seconds']:.0f} s")
    text = summary(results)
    (out / "SUMMARY.md").write_text(text)
    if docs:  # the plots go beside the document, in bench/
        images = docs.parent / "bench"
        images.mkdir(exist_ok=True)
        for png in out.glob("*.png"):
            shutil.copyfile(png, images / png.name)
        update_docs(docs, summary(results, image_prefix="bench/"), START, END)
    print(text)
    return 0


def machine_info(ctx) -> dict:
    from .workload import machine

    return {**machine(), "threads": ctx.threads, "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
            "model": str(ctx.model_dir), "quick": ctx.quick, "gpu": gpu_name(), "device": ctx.device,
            "quantize": ctx.quantize}


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    sys.exit(main())
