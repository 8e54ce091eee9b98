"""Callers sending prompts far beyond the context: what each refusal costs the server, and a
normal request's latency beside them (issue 19's measurement: eight callers of 1 MiB prompts).

A real `loraplex serve` on the model; `--callers` threads each send a `--prompt-chars` prompt,
wait for its refusal, sleep `--pause` seconds and repeat, while one client times `--samples`
normal greedy requests (`--new-tokens` tokens) before and beside them. The server's CPU time
(from /proc) over 100 refusals in a row gives the cost of one. The load generator runs on the
same machine: with `--pause 0` it takes most of the cores itself.

    python -m loraplex.bench.hostile_prompts --callers 8 --pause 0.25
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from .server_process import start_server
from .workload import write_json


def _server_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the converted SmolLM2)")
    p.add_argument("--callers", type=int, default=8)
    p.add_argument("--prompt-chars", type=int, default=1 << 20)
    p.add_argument("--pause", type=float, default=0.25, help="seconds each caller waits between prompts")
    p.add_argument("--samples", type=int, default=8, help="normal requests timed alone and beside the callers")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/out", help="where hostile_prompts.json goes")
    args = p.parse_args(argv)

    from loraplex.clients.client import Client, LoraplexError
    from loraplex.server.engine.loader import resolve_model

    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    server = start_server(resolve_model(args.model), work / "store", work / "serve.log", threads=args.threads,
                          adapter_root=work)
    target, huge = f"127.0.0.1:{server.port}", "x" * args.prompt_chars
    stop, refusals, codes = threading.Event(), [], set()

    def normal(client: Client) -> float:
        begin = time.monotonic()
        client.generate("the quick brown fox", max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        return time.monotonic() - begin

    def hostile(client: Client) -> None:
        begin = time.monotonic()
        try:
            client.generate(huge, max_new_tokens=args.new_tokens)
        except LoraplexError as exc:
            codes.add(exc.code)
        refusals.append(time.monotonic() - begin)

    def caller() -> None:
        with Client(target, timeout=300) as client:
            while not stop.is_set():
                hostile(client)
                stop.wait(args.pause)

    try:
        with Client(target, timeout=300) as client:
            normal(client)
            alone = [normal(client) for _ in range(args.samples)]
            cpu = _server_cpu_seconds(server.proc.pid)
            for _ in range(100):
                hostile(client)
            per_refusal = (_server_cpu_seconds(server.proc.pid) - cpu) / 100
            threads = [threading.Thread(target=caller) for _ in range(args.callers)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            beside = [normal(client) for _ in range(args.samples)]
            stop.set()
            for t in threads:
                t.join()
    finally:
        server.proc.terminate()
        server.proc.wait()
    result = {"callers": args.callers, "prompt_chars": args.prompt_chars, "pause_s": args.pause,
              "server_cpu_ms_per_refusal": 1000 * per_refusal, "refusal_codes": sorted(codes),
              "refusals": len(refusals), "median_refusal_ms": 1000 * statistics.median(refusals),
              "normal_alone_median_s": statistics.median(alone), "normal_beside_median_s": statistics.median(beside),
              "normal_beside_max_s": max(beside)}
    print(f"server CPU per refused {args.prompt_chars}-character prompt: {result['server_cpu_ms_per_refusal']:.1f} ms "
          f"({', '.join(result['refusal_codes'])}); a normal request: median {result['normal_alone_median_s']:.3f} s "
          f"alone, {result['normal_beside_median_s']:.3f} s (max {result['normal_beside_max_s']:.3f} s) beside "
          f"{args.callers} callers pausing {args.pause} s ({len(refusals)} refusals)")
    write_json(Path(args.out) / "hostile_prompts.json", result)
    return result


if __name__ == "__main__":
    main()
