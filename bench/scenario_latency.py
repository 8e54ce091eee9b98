"""Scenario 5: latency under load, up to and past saturation, through a real server.

Poisson arrivals at rising rates, each request naming one of a few resident rank-16 adapters
(or none); p50/p99 time to first token and per output token from the server's histograms,
offered against achieved rate. The queue is bounded (--max-queue), so past saturation the
excess must be refused with RESOURCE_EXHAUSTED at once rather than time out. The load generator
shares the server's cores: the rate it actually sent is reported beside the offered one.
"""
from __future__ import annotations

from .context import BenchContext
from .load_generator import Spec, poisson_arrivals, run as send, summarize
from .report import check, plot, table
from .server_metrics import Window
from .server_process import ensure_registered, start_server
from .workload import ATTENTION, prompts, write_loras

REJECT_WITHIN = 1.0  # seconds: a refused request must be answered this fast


def run(ctx: BenchContext) -> dict:
    rates = ctx.size([1.0, 4.0, 16.0], [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    seconds = ctx.size(4.0, 20.0)
    new_tokens = ctx.size(8, 32)
    max_queue = ctx.size(4, 16)
    adapters = write_loras(ctx.model_dir, ctx.work / "adapters", 8, [16], ATTENTION, seed=0)
    names = [f"l{i}" for i in range(len(adapters))] + [None]
    runs = []
    with start_server(ctx.model_dir, ctx.work / "store-latency", ctx.out / "logs" / "latency.log",
                      "--max-loras", str(len(adapters)), "--max-queue", str(max_queue), "--max-running", "32",
                      *ctx.engine_flags(), threads=ctx.threads, adapter_root=ctx.work) as server:
        ensure_registered(server.target, adapters, "l")
        for rate in rates:
            ctx.log(f"latency: {rate} req/s")
            count = max(2, round(rate * seconds))
            texts = prompts(count)
            specs = [Spec(at, texts[i], new_tokens, names[i % len(names)])
                     for i, at in enumerate(poisson_arrivals(rate, count, seed=int(rate * 10)))]
            before = server.metrics()
            records = send(server.target, specs)
            w = Window(before, server.metrics())
            runs.append({**summarize(records, rate),
                         "ttft_p50": w.quantile("loraplex_time_to_first_token_seconds", 0.5),
                         "ttft_p99": w.quantile("loraplex_time_to_first_token_seconds", 0.99),
                         "tpot_p50": w.quantile("loraplex_time_per_output_token_seconds", 0.5),
                         "tpot_p99": w.quantile("loraplex_time_per_output_token_seconds", 0.99)})
    return result(runs, seconds, new_tokens, max_queue)


def result(runs: list[dict], seconds: float, new_tokens: int, max_queue: int) -> dict:
    # against the rate actually sent: a short Poisson sample can fall well below the nominal rate
    saturated = next((r["offered_rate"] for r in runs
                      if r["failures"] or r["achieved_rate"] < 0.8 * (r["sent_rate"] or r["offered_rate"])), None)
    below = [r for r in runs if saturated is None or r["offered_rate"] < saturated]
    above = [r for r in runs if saturated is not None and r["offered_rate"] >= saturated]
    lost = sum(sum(r["failures"].values()) + r["short_streams"] for r in below)
    wrong = sum(n for r in above for code, n in r["failures"].items() if code != "RESOURCE_EXHAUSTED")
    slow = max((r["rejection_seconds_max"] or 0.0 for r in above), default=0.0)
    checks = [check("failed or short requests below saturation", lost, "0", lost == 0),
              check("failures above saturation that are not RESOURCE_EXHAUSTED", wrong, "0",
                    wrong == 0 if above else None),
              check("slowest refusal above saturation (s)", slow if above else None, f"≤ {REJECT_WITHIN}",
                    slow <= REJECT_WITHIN if above else None)]
    cols = ["offered req/s", "sent req/s", "achieved req/s", "tokens/s", "TTFT p50 s", "TTFT p99 s",
            "TPOT p50 s", "TPOT p99 s", "completed", "refused (RESOURCE_EXHAUSTED)", "other failures"]
    rows = [[r["offered_rate"], r["sent_rate"], r["achieved_rate"], r["tokens_per_s"], r["ttft_p50"], r["ttft_p99"],
             r["tpot_p50"], r["tpot_p99"], r["completed"], r["failures"].get("RESOURCE_EXHAUSTED", 0),
             sum(n for c, n in r["failures"].items() if c != "RESOURCE_EXHAUSTED")] for r in runs]
    x = [r["offered_rate"] for r in runs]
    return {
        "scenario": "latency",
        "title": "5. Latency under load (server-side histograms)",
        "config": {"seconds_per_rate": seconds, "new_tokens": new_tokens, "max_queue": max_queue,
                   "adapters": "8 rank-16 adapters on q, k, v, o and the base, round robin"},
        "tables": [table("Poisson arrivals; TTFT/TPOT from the server's /metrics over each run", cols, rows)],
        "plots": [plot("latency", "p50/p99 latency against offered rate", "offered req/s", "seconds",
                       {"TTFT p50": [[a, r["ttft_p50"]] for a, r in zip(x, runs)],
                        "TTFT p99": [[a, r["ttft_p99"]] for a, r in zip(x, runs)],
                        "TPOT p50": [[a, r["tpot_p50"]] for a, r in zip(x, runs)],
                        "TPOT p99": [[a, r["tpot_p99"]] for a, r in zip(x, runs)]}, logx=True),
                  plot("rate", "achieved against offered rate", "offered req/s", "req/s",
                       {"achieved": [[a, r["achieved_rate"]] for a, r in zip(x, runs)],
                        "offered": [[a, a] for a in x]}, logx=True)],
        "checks": checks,
        "notes": [f"About {seconds:.0f} s of arrivals per rate, {new_tokens} new tokens per request, "
                  f"--max-queue {max_queue}; saturation taken as the first rate with refusals or achieved "
                  f"< 0.8 × the rate sent ({saturated if saturated is not None else 'not reached'} req/s)."],
        "data": {"runs": runs, "saturation": saturated},
    }
