"""Parallel sampling: n completions of one long prompt, against the peers that run here.

Contenders, all in this one process, float32, the same thread count, the same prompt, every
completion generating exactly `--new-tokens` tokens at temperature 0.8:
- loraplex, one request with `n`: the completions share the prompt's KV blocks (completion 0
  computes the prompt, the others only its last block);
- loraplex, n requests of one completion each (seeds seed + i): the prompt computed n times. It
  must give the same tokens as the request with n (checked: completion i uses seed + i);
- Hugging Face `generate(num_return_sequences=n)`, which repeats the prompt n times before its
  prefill.
Contenders are timed round-robin `--repeats` times and the median of each is reported.

    python -m loraplex.bench.parallel_sampling --n 8 --prompt-tokens 512 --new-tokens 32 --threads 2
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .engine_throughput import hf_model
from .workload import TOPICS, machine, print_rates, timed_rounds, write_json

TEMPERATURE = 0.8
SEED = 1


def long_prompt(tokenizer, tokens: int) -> list[int]:
    """`tokens` ids of English text (sentences about the workload's topics, repeated as needed)."""
    text = " ".join(f"Here are some notes about {t}, written for a curious reader." for t in TOPICS)
    ids = tokenizer(text)["input_ids"]
    return (ids * (tokens // len(ids) + 1))[:tokens]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the converted SmolLM2)")
    p.add_argument("--n", type=int, default=8, help="completions per request (at most 16)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
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
    # no prefix cache: rounds replay one prompt; what is measured is the n completions' sharing
    engine = Engine(EngineConfig(model=str(model_dir), threads=args.threads, max_running=max(16, args.n),
                                 prefix_caching=False))
    ids = long_prompt(engine.tokenizer, args.prompt_tokens)
    n, new = args.n, args.new_tokens

    def params(**kw) -> SamplingParams:
        return SamplingParams(max_new_tokens=new, ignore_eos=True, temperature=TEMPERATURE, **kw)

    def shared(round_: int) -> list[list[int]]:
        return [c.token_ids for c in engine.generate([Request(prompt_token_ids=ids, params=params(seed=SEED, n=n))])]

    def separate(round_: int) -> list[list[int]]:
        requests = [Request(prompt_token_ids=ids, params=params(seed=SEED + i)) for i in range(n)]
        return [c.token_ids for c in engine.generate(requests)]

    hf = hf_model(model_dir)
    hf_input = torch.tensor([ids])

    @torch.inference_mode()
    def hf_generate(round_: int) -> list[list[int]]:
        out = hf.generate(hf_input, attention_mask=torch.ones_like(hf_input), do_sample=True, temperature=TEMPERATURE,
                          top_k=0, num_return_sequences=n, max_new_tokens=new, min_new_tokens=new,
                          pad_token_id=engine.tokenizer.eos_token_id)
        return out[:, len(ids):].tolist()

    contenders = {f"loraplex, one request with n={n}": shared, f"loraplex, {n} requests": separate,
                  f"HF generate, num_return_sequences={n}": hf_generate}
    outputs, seconds, rates = timed_rounds(contenders, args.repeats, new)
    same_tokens = outputs[f"loraplex, one request with n={n}"] == outputs[f"loraplex, {n} requests"]
    result = {"machine": machine(), "n": n, "prompt_tokens": len(ids), "new_tokens": new,
              "tokens_per_s": rates, "seconds": seconds, "same_tokens_shared_and_separate": same_tokens,
              "command": "python -m loraplex.bench.parallel_sampling " + " ".join(argv or [])}
    write_json(Path(args.out) / "parallel_sampling.json", result)
    print(f"n={n}, prompt {len(ids)} tokens, {new} new tokens each, {args.threads} threads "
          f"(median of {args.repeats} interleaved rounds)")
    print_rates(rates)
    print(f"  shared and separate give the same tokens: {same_tokens}")
    return result


if __name__ == "__main__":
    main()
