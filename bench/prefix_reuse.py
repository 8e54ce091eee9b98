"""Requests that share a long prompt prefix (an endpoint's template or system message): the
prefix cache against computing every prompt in full, and against Hugging Face `generate`.

Every request is the same `--prefix-tokens` of English text, then its own short question, and
generates `--new-tokens` greedy tokens. Requests arrive in `--waves` waves of `--per-wave`, each
wave one batch after the previous one has finished (the first wave computes the prefix; later
ones find it cached). Contenders, all in this one process, float32, the same thread count:
- loraplex with its prefix cache (the default);
- loraplex with `--no-prefix-caching`: must give the same tokens (checked);
- Hugging Face `generate` on each wave as one left-padded batch.
Timed round-robin `--repeats` times; each round's prompts begin with their own words, so the
cache starts cold every round. The median of each contender is reported.

    python -m loraplex.bench.prefix_reuse --prefix-tokens 512 --waves 4 --per-wave 4 --threads 2
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .engine_throughput import hf_model
from .parallel_sampling import long_prompt
from .workload import TOPICS, machine, print_rates, timed_rounds, write_json


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the converted SmolLM2)")
    p.add_argument("--prefix-tokens", type=int, default=512)
    p.add_argument("--waves", type=int, default=4)
    p.add_argument("--per-wave", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/out", help="directory for the JSON result")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.engine import Engine
    from loraplex.server.engine.loader import resolve_model
    from loraplex.server.engine.sampler import SamplingParams
    from loraplex.server.engine.sequence import Request

    model_dir = resolve_model(args.model)

    def engine(caching: bool) -> Engine:
        return Engine(EngineConfig(model=str(model_dir), threads=args.threads, prefix_caching=caching))

    engines = {True: engine(True), False: engine(False)}
    tokenizer = engines[False].tokenizer
    prefix = long_prompt(tokenizer, args.prefix_tokens)
    count = args.waves * args.per_wave
    questions = [tokenizer(f" Question {i}: what is said about {TOPICS[i % len(TOPICS)]}?")["input_ids"]
                 for i in range(count)]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

    def waves(round_: int) -> list[list[list[int]]]:
        """This round's requests: its own first words, so no round finds the previous one's blocks."""
        head = tokenizer(f"Round {round_}.")["input_ids"]
        return [[head + prefix + q for q in questions[w * args.per_wave:(w + 1) * args.per_wave]]
                for w in range(args.waves)]

    def loraplex(caching: bool):
        def run(round_: int) -> list[list[int]]:
            out = []
            for wave in waves(round_):
                out += [c.token_ids for c in engines[caching].generate(
                    [Request(prompt_token_ids=ids, params=params) for ids in wave])]
            return out
        return run

    hf = hf_model(model_dir)

    @torch.inference_mode()
    def hf_generate(round_: int) -> list[list[int]]:
        out = []
        for wave in waves(round_):
            width = max(len(ids) for ids in wave)
            pad = tokenizer.eos_token_id
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in wave])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in wave])
            gen = hf.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=pad)
            out += gen[:, width:].tolist()
        return out

    contenders = {"loraplex, prefix cache": loraplex(True), "loraplex, no prefix cache": loraplex(False),
                  "HF generate": hf_generate}
    outputs, seconds, rates = timed_rounds(contenders, args.repeats, args.new_tokens)
    same_tokens = outputs["loraplex, prefix cache"] == outputs["loraplex, no prefix cache"]
    result = {"machine": machine(), "prefix_tokens": len(prefix), "waves": args.waves, "per_wave": args.per_wave,
              "new_tokens": args.new_tokens, "tokens_per_s": rates, "seconds": seconds,
              "same_tokens_with_and_without_cache": same_tokens,
              "command": "python -m loraplex.bench.prefix_reuse " + " ".join(argv or [])}
    write_json(Path(args.out) / "prefix_reuse.json", result)
    print(f"{count} requests in {args.waves} waves of {args.per_wave}, a {len(prefix)}-token shared prefix, "
          f"{args.new_tokens} new tokens each, {args.threads} threads (median of {args.repeats} rounds)")
    print_rates(rates)
    print(f"  the same tokens with and without the cache: {same_tokens}")
    return result


if __name__ == "__main__":
    main()
